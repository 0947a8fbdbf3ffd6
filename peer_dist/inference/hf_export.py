"""`peer-dist export --format hf`: a folder Hugging Face transformers loads with trust_remote_code.

    config.json                    PeerDistConfig values, auto_map to the two modules below
    configuration_peer_dist.py     the config class  } written for this folder (peer_dist/inference/hf/):
    modeling_peer_dist.py          the model         } they import torch and transformers, never peer_dist
    model.safetensors              the export's weights under peer_dist's own names
    tokenizer.json                 byte or BPE tokenizer with the end-of-text id as a special token that
    tokenizer_config.json          every encoding starts with (the document start, as `peer-dist generate`)
    generation_config.json         end-of-text as bos / eos / pad
    peer_dist_export.json          the export's provenance (export.json)

Writing it needs neither transformers nor a GPU; loading it needs ``pip install peer-dist[hf]``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peer_dist.checkpoint.export import INFO, WEIGHTS, Export, export_checkpoint, open_export
from peer_dist.config import from_dict, resolve_ffn_blocks
from peer_dist.errors import CheckpointError

HF_SOURCES = Path(__file__).with_name("hf")
MODULES = ("configuration_peer_dist.py", "modeling_peer_dist.py")
EOT_NAMES = ("<|endoftext|>", "<|peer_dist_endoftext|>")


def export_hf(source: str | Path, output: str | Path, overwrite: bool = False, data: str | None = None) -> Path:
    """The HF folder of an export, or of a checkpoint (exported on the way)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"--output {output} is a file; give a folder for the Hugging Face model")
    if (output / "config.json").exists() and not overwrite:
        raise CheckpointError(f"{output} already holds a model; pass --overwrite to replace it")
    export = open_export(Path(source))
    if export is not None:
        return write_hf(export, output)
    with tempfile.TemporaryDirectory(prefix="peer-dist-export-") as tmp:
        native = open_export(export_checkpoint(source, Path(tmp) / "export", data=data))
        assert native is not None
        return write_hf(native, output)


def write_hf(export: Export, output: Path) -> Path:
    if "tokenizer" not in export.info:
        raise CheckpointError(f"export {export.path} has no {INFO} (an older version): re-export its checkpoint")
    tok = export.tokenizer()
    eot_name = _eot_name(tok)
    output.mkdir(parents=True, exist_ok=True)
    for name in MODULES:
        shutil.copyfile(HF_SOURCES / name, output / name)
    shutil.copyfile(export.path / WEIGHTS, output / WEIGHTS)
    config = hf_config(export, tok.eot_id)
    _write_json(output / "config.json", config)
    _write_json(output / "generation_config.json", {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id,
                                                   "pad_token_id": tok.eot_id})
    hf_tokenizer(tok, eot_name).save(str(output / "tokenizer.json"))
    _write_json(output / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot_name, "eos_token": eot_name,
        "pad_token": eot_name, "model_max_length": config["max_position_embeddings"], "padding_side": "left",
        "clean_up_tokenization_spaces": False})
    _write_json(output / "special_tokens_map.json", {"bos_token": eot_name, "eos_token": eot_name,
                                                     "pad_token": eot_name})
    _write_json(output / "peer_dist_export.json", export.info)
    return output


def hf_config(export: Export, eot_id: int) -> dict[str, Any]:
    """config.json: the model section of the export's config in PeerDistConfig's names."""
    m = from_dict(export.config_dict()).model
    if m.add_peer != "none":  # the written modeling file knows one FFN per block
        raise CheckpointError(f"export {export.path} has PEER layers added by model.add_peer = {m.add_peer!r}: the "
                              "Hugging Face format does not cover them yet (use the peer-dist export)")
    special = set(resolve_ffn_blocks(m.ffn_blocks, m.n_layers))
    return {
        "architectures": ["PeerDistForCausalLM"], "model_type": "peer_dist",
        "auto_map": {"AutoConfig": "configuration_peer_dist.PeerDistConfig",
                     "AutoModelForCausalLM": "modeling_peer_dist.PeerDistForCausalLM"},
        "vocab_size": export.info["vocab_size"], "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "intermediate_size": m.d_ff, "mlp": m.mlp,
        "ffn_kinds": [m.ffn if i in special else "dense" for i in range(m.n_layers)],
        "share_embeddings": m.tie_embeddings, "tie_word_embeddings": False, "rope_theta": m.rope_theta,
        "max_position_embeddings": export.context_length,
        "peer": {k: getattr(m.peer, k) for k in ("num_experts", "heads", "topk", "d_key", "activation", "query_norm")},
        "moe": {k: getattr(m.moe, k) for k in ("num_experts", "topk", "d_expert")},
        "pkm": {k: getattr(m.pkm, k) for k in ("num_values", "heads", "topk", "d_key", "query_norm")},
        "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id, "use_cache": True,
        "dtype": "float32",
    }


def _eot_name(tok: Any) -> str:
    """A name for the end-of-text id that the text vocabulary does not already use."""
    vocab = _vocab(tok)
    for name in EOT_NAMES:
        if name not in vocab:
            return name
    raise CheckpointError(f"the tokenizer already has tokens named {', '.join(EOT_NAMES)}")


def _vocab(tok: Any) -> dict[str, int]:
    return {} if tok.name == "byte" else tok._tok.get_vocab()


def hf_tokenizer(tok: Any, eot_name: str) -> Any:
    """A ``tokenizers.Tokenizer`` with our ids (bytes 0..255 for the byte tokenizer), the end-of-text
    id as a special token, and a post-processor that puts it in front of every encoding."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if tok.name == "byte":
        # Byte-level BPE without merges: byte b is the symbol bytes_to_unicode(b) with id b.
        symbols = _bytes_to_unicode()
        hf = Tokenizer(models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
    else:
        hf = Tokenizer.from_str(tok._tok.to_str())
    hf.add_special_tokens([AddedToken(eot_name, special=True, normalized=False)])
    if hf.token_to_id(eot_name) != tok.eot_id:
        raise CheckpointError(f"the end-of-text token got id {hf.token_to_id(eot_name)}, the model uses {tok.eot_id}")
    hf.post_processor = processors.TemplateProcessing(
        single=f"{eot_name} $A", pair=f"{eot_name} $A {eot_name} $B:1", special_tokens=[(eot_name, tok.eot_id)])
    return hf


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
