

def require_prepared_data(data: str) -> None:
    """A benchmark that trains needs a prepared data folder: one clear error if there is none."""
    from pathlib import Path

    from peer_dist.errors import ConfigError

    if not (Path(data) / "manifest.json").is_file():
        raise ConfigError(f"--data {data}: no prepared data there; run `peer-dist prepare --output {data}` "
                          "(or the quickstart) first")
