"""`make export-onnx`: the merged model as one ONNX decoder graph with a KV cache, run by ONNX Runtime.

Why not optimum: the issue asked for optimum's exporter, but no release of it runs on this
project's transformers 5. optimum >= 2.0 moved the ONNX exporter into the separate optimum-onnx
package, whose newest release (0.1.0) requires ``transformers<4.58`` (and ``optimum~=2.1``);
optimum 1.27, the last with the exporter built in, requires ``transformers<4.54`` for it.
Transformers-5 support is an open request (huggingface/optimum-onnx#114; PR #140 was closed
unmerged). Downgrading transformers for the whole project is not an option, so the export uses
torch's own exporter (``torch.onnx.export(dynamo=True)``) on a small wrapper, and the few lines
of generation that optimum's ORTModelForCausalLM would provide live in ``OnnxCausalLM`` below.

The graph follows optimum's decoder-with-past naming, so other ONNX tooling recognises it:
inputs ``input_ids``, ``attention_mask`` [batch, past + seq], ``position_ids``,
``logits_to_keep`` (positions whose logits to compute: ``[-1]`` while generating, all for
scoring) and ``past_key_values.<i>.key/value`` [batch, kv_heads, past, head_dim]; outputs
``logits`` and ``present.<i>.key/value``. Prefill passes an empty (length 0) past, each decode
step one token and the previous step's ``present``. Works for every family whose transformers
implementation uses the standard ``DynamicCache``: GLM and Qwen2 are tested, Qwen3, Llama and
Gemma-3 export and pass the built-in check too (Gemma-3's sliding-window layers only within
their window). An export is checked against PyTorch before the command returns.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from app.config import Config
from app.core.errors import UserError
from app.models.artifacts import META_FILE, ONNX_DATA, ONNX_FILE, dir_problems, is_onnx_dir, load_failure, read_json

log = logging.getLogger(__name__)


def _decoder_wrapper(model: Any, num_layers: int) -> Any:
    """nn.Module taking flat past tensors (ONNX has no cache objects) and returning flat presents."""
    import torch
    from transformers import DynamicCache

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, logits_to_keep: Any,
                    past: list[tuple[Any, Any]]) -> tuple[Any, ...]:
            cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past], config=self.model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
            return (out.logits, *[t for layer in out.past_key_values.layers[:num_layers]
                                   for t in (layer.keys, layer.values)])

    return Decoder().eval()


def export_model(src: str | Path, out: str | Path, trust_remote_code: bool = False) -> Path:
    """Export the standalone model at ``src`` (config + weights + tokenizer) to ``out``; verify with ORT."""
    import contextlib
    import io

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from app.core.utils import peak_rss_mb, replace_dir, write_json

    _check_replaceable(out)  # before the minutes an export takes
    from app.models.loading import _load_error, load_tokenizer

    tokenizer = load_tokenizer(str(src), trust_remote_code)
    try:  # fp32 on the CPU whatever the machine: the export is for CPU inference
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="sdpa",
                                                     trust_remote_code=trust_remote_code).eval()
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot load this model"
        raise _load_error(str(src), e) from None
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():  # a real short forward gives the cache layout (layers, kv heads, head dim) per family
        cache = model(input_ids=ids, use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(x, "keys") and x.keys is not None for x in layers):
        raise UserError(f"{src}: its {type(model).__name__} does not use transformers' standard KV cache, so it "
                        "cannot be exported to ONNX here; GLM (-hf), Qwen2/3 and Llama checkpoints can")
    past = [(x.keys.clone(), x.values.clone()) for x in layers]
    window = getattr(model.config, "sliding_window", None)
    if window and "sliding_attention" in (getattr(model.config, "layer_types", None) or []):
        log.warning("%s has sliding-window attention: the ONNX export is exact only for contexts shorter than "
                    "its window (%d tokens)", type(model).__name__, window)
    n = len(past)
    names_in = ["input_ids", "attention_mask", "position_ids", "logits_to_keep"] + [
        f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    names_out = ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    dim = torch.export.Dim
    batch, seq, plen, total, keep = dim("batch"), dim("seq"), dim("past"), dim("total"), dim("keep")
    example = (torch.tensor([[6, 7, 8, 9, 10]]), torch.ones(1, 8, dtype=torch.long), torch.arange(3, 8)[None],
               torch.arange(5), past)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
              "position_ids": {0: batch, 1: seq}, "logits_to_keep": {0: keep},
              "past": [({0: batch, 2: plen}, {0: batch, 2: plen}) for _ in range(n)]}
    log.info("exporting %s (%s, %d layers) to ONNX; takes ~10 s for a tiny model, ~1 min for 100M parameters",
             src, type(model).__name__, n)
    chatter = io.StringIO()  # the exporter prints its progress to stdout, and logs and warns a lot
    for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(chatter), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_decoder_wrapper(model, n), example, dynamic_shapes=shapes,
                                    input_names=names_in, output_names=names_out, dynamo=True, verbose=False)
    log.debug("torch.onnx: %s", chatter.getvalue())
    out = Path(out)
    with replace_dir(out, META_FILE, "ONNX_DIR") as tmp:  # whole: a kill leaves the previous export or none
        program.save(str(tmp / ONNX_FILE), external_data=True)  # weights in model.onnx.data: no 2 GB limit
        model.config.save_pretrained(tmp)
        (model.generation_config or GenerationConfig()).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {f: (tmp / f).stat().st_size for f in (ONNX_FILE, ONNX_DATA) if (tmp / f).is_file()}
        write_json(tmp / META_FILE, {"files": files,  # sizes: a truncated copy is found without loading it
            "source": str(src), "architecture": type(model).__name__, "num_layers": n,
            "past_shape": [list(k.shape[1:2]) + list(k.shape[3:]) for k, _ in past],  # [kv_heads, head_dim]
            "dtype": "float32", "inputs": names_in, "outputs": names_out,
            "torch": torch.__version__, "exporter": "torch.onnx.export(dynamo=True)"})
        diff = verify(model, tmp)  # before anything replaces an earlier export
    log.info("exported %s -> %s; ONNX Runtime logits match PyTorch (max |diff| %.1e); peak RSS %.0f MB",
             src, out, diff, peak_rss_mb())
    return out


def verify(model: Any, onnx_dir: str | Path, tol: float = 1e-3) -> float:
    """Max |logits difference| of ORT vs PyTorch over a prompt and one cached decode step; raises
    when it exceeds ``tol`` times the largest logit (at least 1)."""
    import torch

    ort = OnnxCausalLM(onnx_dir)
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True)
        nxt = ref.logits[:, -1:].argmax(-1)
        ref2 = model(input_ids=nxt, past_key_values=ref.past_key_values, use_cache=True).logits
    logits, past = ort.forward(ids.numpy(), keep_all=True)
    logits2, _ = ort.forward(nxt.numpy(), past=past)
    diff = max(float(abs(logits - ref.logits.numpy()).max()), float(abs(logits2 - ref2.numpy()).max()))
    if diff > tol * max(1.0, float(ref.logits.abs().max())):
        raise RuntimeError(f"ONNX export of {model.config.model_type} differs from PyTorch by {diff:.3g} (> {tol})")
    return diff


def source_for(cfg: Config) -> tuple[str, Path]:
    """(standalone model to export, ONNX dir): the merged adapter (merging first when needed),
    a METHOD=full output, or with ADAPTER_DIR=none the base MODEL_NAME."""
    from app.inference.merge import run_merge
    from app.models.artifacts import find_adapter, is_full_model
    from app.models.tiny import resolve_model

    adapter = find_adapter(cfg)
    onnx_dir = cfg.predict.onnx_dir
    if adapter is None:  # the base model itself (a local dir, tiny, or a hub name)
        name = cfg.model.model_name
        return resolve_model(name), Path(onnx_dir or Path("models/onnx") / Path(name).name)
    if is_onnx_dir(adapter):
        raise UserError(f"ADAPTER_DIR={adapter} is already an ONNX export; predict on it with ADAPTER_DIR={adapter}")
    if is_full_model(adapter):
        return str(adapter), Path(onnx_dir or adapter / "onnx")
    kind = read_json(adapter / "adapter_config.json", f"ADAPTER_DIR={adapter}").get("peft_type", "LORA")
    if kind != "LORA":
        raise UserError(f"ADAPTER_DIR={adapter}: a {kind} adapter (METHOD=ptuning) adds prefixes at run time and "
                        "cannot be merged into the weights, so there is no standalone model to export; export a "
                        "METHOD=lora/qlora/full run, or predict on this adapter with PyTorch")
    merged = Path(cfg.predict.merged_dir or adapter / "merged")
    weights = max((p.stat().st_mtime for p in adapter.glob("adapter_model.*")), default=0.0)
    # MERGED_DIR is swapped in whole (app.core.utils.replace_dir), so a present one is a finished merge; the
    # integrity check still refuses one that was damaged since (or half-written by an older version).
    current = ((merged / "config.json").is_file() and (merged / "config.json").stat().st_mtime >= weights
               and not dir_problems(merged, f"MERGED_DIR={merged}"))
    if not current:
        log.info("no up-to-date merged model in %s: merging %s first", merged, adapter)
        merged = run_merge(cfg)
    return str(merged), Path(onnx_dir or merged / "onnx")


def run_export(cfg: Config) -> Path:
    if cfg.predict.onnx_dir:  # a folder of yours is refused before anything is merged or exported
        _check_replaceable(cfg.predict.onnx_dir)
    src, out = source_for(cfg)
    return export_model(src, out, cfg.model.trust_remote_code)


def _check_replaceable(out: str | Path) -> None:
    from app.core.utils import replace_problem

    problem = replace_problem(out, META_FILE, "ONNX_DIR")
    if problem:
        raise UserError(problem)


class OnnxCausalLM:
    """An exported model in ONNX Runtime, with the part of transformers' model API that app uses:
    ``generate`` (greedy or sampled, batched with left padding, stop tokens, a streamer),
    ``model(input_ids).logits``, ``.device``, ``.eval()``. Predict and evaluate run on it unchanged."""

    training = False

    def __init__(self, path: str | Path, num_threads: int = 0, setting: str = "ADAPTER_DIR"):
        import onnxruntime
        import torch

        from app.core.utils import usable_cpus

        self.path = Path(path)
        label = f"{setting}={self.path}"  # ``setting``: what the user set to name this export, for errors
        self.meta = read_json(self.path / META_FILE, label)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = num_threads or usable_cpus()
        opts.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(str(self.path / ONNX_FILE), opts,
                                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT's own error types; a damaged file is the usual cause
            raise load_failure(self.path, label, e, any_error=True) from None
        self.past_names = [n for n in self.meta["inputs"] if n.startswith("past_key_values.")]
        gen_file = self.path / "generation_config.json"
        gen = read_json(gen_file, label) if gen_file.is_file() else {}
        eos = gen.get("eos_token_id")
        self.eos_token_id: list[int] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.pad_token_id: int | None = gen.get("pad_token_id")
        self.top_k, self.top_p = gen.get("top_k"), gen.get("top_p")
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(model_type=self.meta["architecture"], onnx=True)

    def eval(self) -> "OnnxCausalLM":
        return self

    def train(self, mode: bool = True) -> "OnnxCausalLM":
        return self

    def forward(self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None,
                past: list[Any] | None = None, keep_all: bool = False) -> tuple[Any, list[Any]]:
        """One graph run on numpy int64 arrays -> (logits, presents). ``past=None``: a fresh prompt."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        if past is None:
            past = [np.zeros([b, h, 0, d], np.float32) for h, d in self.meta["past_shape"] for _ in range(2)]
        total = s + past[0].shape[2]
        mask = np.ones((b, total), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if position_ids is None:
            position_ids = np.where(mask == 0, 1, mask.cumsum(-1) - 1)[:, -s:]
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.asarray(position_ids, np.int64),
                "logits_to_keep": np.arange(s, dtype=np.int64) if keep_all else np.array([s - 1], np.int64),
                **dict(zip(self.past_names, past))}
        logits, *presents = self.session.run(None, feed)
        return logits, presents

    def __call__(self, input_ids: Any, attention_mask: Any = None, **_: Any) -> SimpleNamespace:
        import torch

        mask = None if attention_mask is None else attention_mask.cpu().numpy()
        logits, _ = self.forward(input_ids.cpu().numpy(), mask, keep_all=True)
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def generate(self, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, pad_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None, streamer: Any = None, use_cache: bool = True,
                 ) -> Any:
        """Like transformers' generate: prompt + new tokens; finished rows are padded with pad_token_id."""
        import numpy as np
        import torch

        ids = input_ids.cpu().numpy().astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy().astype(np.int64)
        eos = self.eos_token_id if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) \
            else list(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id if self.pad_token_id is not None \
            else (eos[0] if eos else 0)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        position_ids = np.where(mask == 0, 1, mask.cumsum(-1) - 1)
        running = np.ones(len(ids), bool)
        new: list[Any] = []
        step_ids, past = ids, None
        for _ in range(max_new_tokens):
            logits, past = self.forward(step_ids, mask, position_ids, past)
            nxt = self._pick(logits[:, -1], do_sample, temperature)
            nxt = np.where(running, nxt, pad)
            new.append(nxt)
            if streamer is not None:
                streamer.put(torch.from_numpy(nxt))
            running &= ~np.isin(nxt, eos)
            if not running.any():
                break
            step_ids = nxt[:, None]
            mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
            position_ids = position_ids[:, -1:] + 1
        if streamer is not None:
            streamer.end()
        return torch.from_numpy(np.concatenate([ids, np.stack(new, axis=1)], axis=1) if new else ids)

    def _pick(self, logits: Any, do_sample: bool, temperature: float) -> Any:
        """Next token ids from last-position logits: argmax, or transformers' temperature/top-k/top-p sampling."""
        import torch

        if not do_sample:
            return logits.argmax(-1)
        scores = torch.from_numpy(logits).float() / max(temperature, 1e-5)
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[..., -1:] = False
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(scores.softmax(-1), 1)[:, 0].numpy()

