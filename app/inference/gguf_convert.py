"""The child process app.inference.llamacpp runs for each llama.cpp step (PYTHONPATH holds the converter):

    python -m app.inference.gguf_convert convert HF_DIR --outfile F --outtype T     (convert_hf_to_gguf.py)
    python -m app.inference.gguf_convert convert-lora LORA_DIR --base HF_DIR ...     (convert_lora_to_gguf.py)
    python -m app.inference.gguf_convert quantize SRC DST LLAMA_FTYPE_NAME THREADS   (llama_model_quantize)
    python -m app.inference.gguf_convert set-metadata FILE KEY VALUE --force         (gguf_set_metadata.py)

llama.cpp's scripts run as they are. The one thing said to them is which pre-tokenizer the tiny models'
locally trained tokenizers use: the converter knows a BPE tokenizer by a hash of the ids it gives, so one
trained here is in none of its tables ("BPE pre-tokenizer was not recognized"). The model's converter class
is registered again, through the converter's own ModelBase.register, as a subclass that asks the
converter's check first and, only where it has no answer, recognises a pre-tokenizer exactly equal to one of
ours (recognised_pre) by its definition; any other tokenizer is refused as before.
tests/inference/test_gguf_tokens.py proves that llama.cpp then gives the HF tokenizer's ids.
"""

from __future__ import annotations

import ctypes
import json
import runpy
import sys
from pathlib import Path

# Pre-tokenizers of the tokenizers trained here, as transformers loads them, -> llama.cpp's name for the same
# split. The tiny models' (app.models.tiny.runtime_pre_tokenizer); and Qwen2's own, which transformers' Qwen2Tokenizer
# puts in place of any other (tiny-qwen2's included): llama.cpp's "qwen2" is that regex (llama-vocab.cpp).
QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def recognised_pre(tokenizer: object) -> str | None:
    """llama.cpp's pre-tokenizer name for ``tokenizer`` (as the converter loaded it) when it is one of ours."""
    from tokenizers import Tokenizer, models

    from app.models.tiny import GGUF_PRE_TOKENIZER, runtime_pre_tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    have = json.loads(backend.to_str()).get("pre_tokenizer")
    recipe = Tokenizer(models.BPE())
    recipe.pre_tokenizer = runtime_pre_tokenizer()
    if have == json.loads(recipe.to_str())["pre_tokenizer"]:
        return GGUF_PRE_TOKENIZER
    steps = (have or {}).get("pretokenizers") or []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern") == {"Regex": QWEN2_SPLIT}
        and steps[0].get("behavior") == "Isolated"
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex")
    ):
        return "qwen2"
    return None


def _recognise(model_dir: Path) -> None:
    """The model's converter class again, answering for the tokenizers above where the converter's table of
    hashes has no answer (it raises NotImplementedError then): any other tokenizer is refused as before."""
    from conversion import ModelBase, get_model_class  # type: ignore[import-not-found]  # llama.cpp's, on sys.path

    arch = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    known = get_model_class(arch)

    class Recognised(known):  # type: ignore[misc, valid-type]
        model_arch = known.model_arch  # the converter asks each class to name its own

        def get_vocab_base_pre(self, tokenizer: object) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                ours = recognised_pre(tokenizer)
                if ours is None:
                    raise
                return ours

    Recognised.__name__ = Recognised.__qualname__ = known.__name__
    ModelBase.register(arch)(Recognised)


def _run_script(script: str, args: list[str], model_dir: Path) -> None:
    from app.inference.llamacpp import converter_dir

    path = converter_dir() / script
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(converter_dir()))
    sys.path.insert(1, str(converter_dir() / "gguf-py"))
    _recognise(model_dir)
    runpy.run_path(str(path), run_name="__main__")


def _quantize(src: str, dst: str, ftype: str, threads: str) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = int(threads)
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))


def main(argv: list[str]) -> int:
    step, args = argv[0], argv[1:]
    if step == "quantize":
        return _quantize(*args)
    if step == "convert":
        _run_script("convert_hf_to_gguf.py", args, Path(args[0]))
    elif step == "set-metadata":
        from app.inference.llamacpp import converter_dir

        sys.argv = ["gguf_set_metadata.py", *args]
        runpy.run_path(
            str(converter_dir() / "gguf-py" / "gguf" / "scripts" / "gguf_set_metadata.py"), run_name="__main__"
        )
    elif step == "convert-lora":
        _run_script("convert_lora_to_gguf.py", args, Path(args[args.index("--base") + 1]))
    else:
        raise SystemExit(f"unknown step {step!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
