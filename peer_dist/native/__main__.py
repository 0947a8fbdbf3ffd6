"""`python -m peer_dist.native`: compile the CPU kernels ahead of time and print where they are."""

from peer_dist.native import build

if __name__ == "__main__":
    print(build())
