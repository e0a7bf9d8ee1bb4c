"""Prediction: built-in prompt, PROMPT, a file of prompts/records, or an interactive chat.

The base model comes from the adapter's own train_config.json unless MODEL_NAME was set
explicitly, so ``make predict`` after ``make train MODEL_NAME=tiny`` needs no repetition.
Prompts are rendered exactly as in training (app.data.encode.prompt_text), else the adapter
would see a format it never learnt.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from app.config import Config
from app.core import diskspace, generated
from app.core.atomic import atomic_write_text
from app.core.errors import UserError
from app.core.utils import set_threads
from app.data.encode import prompt_text
from app.data.records import detect_format, to_example
from app.inference.terminal_chat import chat, context_size, overflow
from app.models.artifacts import base_model_for, find_adapter, is_full_model, is_onnx_dir, onnx_is_stale
from app.models.loading import load_adapter, load_model, load_tokenizer, remote_code_error
from app.models.quantization import half_embeddings_on_cpu, serve_half_embeddings
from app.models.tiny import resolve_model

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from app.inference.generate import CausalLM

log = logging.getLogger(__name__)

# The classic job, in the exact context format the triplet data uses.
BUILTIN_PROMPT = (
    "Instruction: 你现在是一个很厉害的阅读理解器，严格按照人类指令进行回答。\n"
    "Input: 句子中包含了哪些信息，输出json：\n\n"
    "《星河往事》是由林远执导，陈雨桐、周景行主演的电视剧，2019年在北京首播。\nAnswer: "
)


def load_base(
    name_or_path: str, quant: str, trust_remote_code: bool = False, setting: str = "MODEL_NAME"
) -> PreTrainedModel:
    """The base model for answering, in the dtypes training gave it: a CPU k-bit model keeps its embeddings
    and head in bf16 as training did (app/models/quantization.py), so an adapter sees the same logits."""
    import torch

    half = half_embeddings_on_cpu(quant, torch.cuda.is_available())
    model = load_model(name_or_path, trust_remote_code, quant, bf16=half, setting=setting)
    return serve_half_embeddings(model) if half else model


class Predictor:
    """Base model + optional adapter, ready to answer prompts."""

    model: CausalLM
    tokenizer: PreTrainedTokenizerBase

    def __init__(self, cfg: Config):
        self.cfg = cfg
        set_threads(cfg.model.num_threads)
        self.adapter = find_adapter(cfg)
        name, quant = base_model_for(cfg, self.adapter)
        # what runs, for evaluate's estimate: (engine, QUANT_LEVEL or GGUF_QUANT, the base's dir, the GGUF or "")
        self.engine: tuple[str, str, str, str] = ("torch", quant, name, "")
        from app.inference.onnx_model import OnnxCausalLM

        if cfg.predict.infer_backend == "llama.cpp":
            self._load_gguf(cfg)
            return
        # Which setting names the dir a load reads, for the one line a damaged file gives.
        setting = "ADAPTER_DIR" if self.adapter is not None and is_full_model(self.adapter) else "MODEL_NAME"
        if is_onnx_dir(name):  # `make export-onnx` output: ONNX Runtime instead of PyTorch
            if self.adapter is not None and not is_full_model(self.adapter):
                log.warning(
                    "ADAPTER_DIR=%s is not applied to the ONNX export %s (export a merged adapter instead)",
                    self.adapter,
                    name,
                )
            stale = onnx_is_stale(Path(name))
            if stale is not None:
                log.warning(
                    "%s was exported before %s was last written (merged again?): it is the older model; "
                    "`make export-onnx ADAPTER_DIR=%s` brings it up to date",
                    name,
                    stale,
                    stale,
                )
            self.tokenizer = load_tokenizer(name, cfg.model.trust_remote_code, setting=setting)
            self.model = OnnxCausalLM(name, cfg.model.num_threads, setting=setting)
            self.engine = ("onnx", "none", name, "")
            log.info("model %s (ONNX Runtime)", name)
            return
        base = resolve_model(name)
        self.engine = ("torch", quant, base, "")
        # The adapter dir carries the tokenizer it was trained with (pad token, template).
        own_tok = self.adapter is not None and (self.adapter / "tokenizer_config.json").is_file()
        self.tokenizer = load_tokenizer(
            str(self.adapter) if own_tok else base,
            cfg.model.trust_remote_code,
            setting="ADAPTER_DIR" if own_tok else setting,
        )
        model: PreTrainedModel | PeftModel = load_base(base, quant, cfg.model.trust_remote_code, setting)
        if self.adapter is not None and not is_full_model(self.adapter):
            model = load_adapter(model, self.adapter)
        self.model = model.eval()
        log.info(
            "model %s%s%s",
            name,
            "" if quant == "none" else f" ({quant})",
            f" + adapter {self.adapter}" if self.adapter else " (no adapter)",
        )

    def _load_gguf(self, cfg: Config) -> None:
        """INFER_BACKEND=llama.cpp: the run as a GGUF (exported first when needed) in llama.cpp, and the
        tokenizer the torch backend would use, which renders and tokenizes every prompt as it does."""
        from app.inference.gguf_export import ensure_gguf
        from app.inference.gguf_files import GENERATION_FILE
        from app.inference.llamacpp_model import LlamaCppCausalLM
        from app.models.artifacts import parse_json

        path, src = ensure_gguf(cfg)
        self.engine = ("llama.cpp", cfg.predict.gguf_quant, str(src.base_dir), str(path))
        own_tok = self.adapter is not None and (self.adapter / "tokenizer_config.json").is_file()
        self.tokenizer = load_tokenizer(
            str(self.adapter if own_tok else src.base_dir),
            cfg.model.trust_remote_code,
            setting="ADAPTER_DIR" if own_tok else "MODEL_NAME",
        )
        generation, _ = parse_json(path.parent / GENERATION_FILE)
        self.model = LlamaCppCausalLM(
            path,
            cfg.model.num_threads,
            n_seq=max(1, cfg.predict.predict_batch_size),
            generation=generation if isinstance(generation, dict) else None,
            exact=cfg.predict.gguf_quant in ("f16", "bf16"),
        )
        log.info("model %s (llama.cpp, %s)", path, cfg.predict.gguf_quant)

    def _sampling(self) -> dict[str, Any]:
        t = self.cfg.predict.temperature
        return {"do_sample": True, "temperature": t} if t > 0 else {"do_sample": False}

    def generate(self, messages: list[dict[str, str]], stream: bool = False) -> str:
        import torch
        from transformers import TextStreamer

        text = prompt_text(self.tokenizer, messages)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        p = self.cfg.predict
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = cast(Any, self.model).generate(  # a PeftModel's generate is its base's, via __getattr__
                    **enc,
                    max_new_tokens=p.max_new_tokens,
                    streamer=streamer,
                    use_cache=True,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **self._sampling(),
                )
        except (AttributeError, TypeError) as e:  # old remote code (ChatGLM-6B/2/3) on new transformers
            known = remote_code_error(self.cfg.model.model_name, e) if self.cfg.model.trust_remote_code else None
            if known is None:
                raise
            raise known from None
        new = out[0, enc["input_ids"].shape[1] :]
        self._speed(int(new.numel()), time.perf_counter() - t0)
        return cast(str, self.tokenizer.decode(new, skip_special_tokens=True))  # one sequence: one text

    def generate_many(self, conversations: list[list[dict[str, str]]], progress: bool = True) -> list[str]:
        """Answers for many conversations, in their order: PREDICT_BATCH_SIZE prompts of similar length
        generate together (left-padded, KV-cached), which on a CPU multiplies the tokens per second."""
        from app.inference.generate import generate_batch

        stats: dict[str, int] = {}
        t0 = time.perf_counter()
        outputs = generate_batch(
            self.model,
            self.tokenizer,
            conversations,
            self.cfg.predict.max_new_tokens,
            self.cfg.predict.predict_batch_size,
            progress,
            self._sampling(),
            stats,
        )
        self._speed(stats.get("new_tokens", 0), time.perf_counter() - t0)
        return outputs

    def _speed(self, tokens: int, seconds: float) -> None:
        """Generated tokens per second, to the log (stderr) and ``last_speed``."""
        self.last_speed = (tokens, seconds)
        log.info("generated %d tokens in %.1fs: %.1f tokens/s", tokens, seconds, tokens / max(seconds, 1e-9))


def _file_prompts(path: Path, fmt: str) -> Iterator[tuple[int, list[dict[str, str]], str | None]]:
    """(line, prompt messages, reference answer or None) for each line; plain lines are prompts."""
    with path.open(encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict):
                yield n, [{"role": "user", "content": line.rstrip("\n")}], None
                continue
            kind = detect_format(rec) if fmt == "auto" else fmt
            if kind is None:
                raise UserError(
                    f"INPUT_FILE={path}: line {n} has fields {sorted(rec)[:6]} that name no "
                    "known format; use context/target, instruction/output, messages or plain lines"
                )
            try:
                ex = to_example(rec if kind == "text" else _with_dummy_answer(rec, kind), kind, n)
            except ValueError as e:
                raise UserError(f"INPUT_FILE={path}: line {n}: {e}") from None
            if ex.text is not None:
                yield n, [{"role": "user", "content": ex.text}], None
            else:
                ref = ex.answer if ex.answer != "\0" else None
                yield n, ex.prompt_messages, ref


def _with_dummy_answer(rec: dict[str, Any], kind: str) -> dict[str, Any]:
    # Records in a prediction file may lack the answer; a placeholder lets to_example parse them.
    if kind == "alpaca" and not str(rec.get("output", "")).strip():
        return {**rec, "output": "\0"}
    if kind == "context_target" and not str(rec.get("target", "")).strip():
        return {**rec, "target": "\0"}
    turns_key = {"messages": "messages", "sharegpt": "conversations"}.get(kind)
    if turns_key and isinstance(rec.get(turns_key), list) and rec[turns_key]:
        last = rec[turns_key][-1]
        if isinstance(last, dict) and str(last.get("role", last.get("from", ""))).lower() in ("user", "human"):
            role_key, text_key, role = (
                ("role", "content", "assistant") if kind == "messages" else ("from", "value", "gpt")
            )
            return {**rec, turns_key: rec[turns_key] + [{role_key: role, text_key: "\0"}]}
    return rec


def predict_file(pred: Predictor, cfg: Config) -> Path:
    src = Path(cfg.predict.input_file)
    if not src.is_file():
        raise UserError(f"INPUT_FILE={src}: no such file")
    dest = generated.predictions_path(str(src), cfg.predict.output_file)
    items = list(_file_prompts(src, cfg.data.data_format))  # parse all first: bad input fails before work
    if not items:  # most likely the wrong file: and an empty OUTPUT_FILE would replace an earlier one
        raise UserError(
            f"INPUT_FILE={src} has no prompt (no line with text): 0 predictions, {dest} not written; "
            "put one prompt or record per line"
        )
    taken = generated.replace_problem(dest, "OUTPUT_FILE")  # the pre-flight said so too: a file of yours stays
    if taken:
        raise UserError(taken)
    context = context_size(pred.model, pred.tokenizer)
    for line, msgs, _ in items:  # as PROMPT is: refused before any answer is generated
        too_long = overflow(pred, msgs, context, "that line")
        if too_long:
            raise UserError(f"INPUT_FILE={src}: line {line} {too_long}")
    outputs = pred.generate_many([msgs for _, msgs, _ in items])
    rows = []
    for (line, msgs, ref), output in zip(items, outputs, strict=True):
        rows.append(
            {
                "line": line,
                "prompt": msgs[-1]["content"],
                "output": output,
                **({"reference": ref} if ref is not None else {}),
            }
        )
    try:  # whole or not at all, with the umask's permissions; recorded as the tool's, so a rerun may replace it
        atomic_write_text(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        generated.record(dest, generated.PREDICTIONS)
    except OSError as e:
        if not diskspace.is_full(e, dest.parent):
            raise
        raise UserError(
            diskspace.full_line(
                "OUTPUT_FILE",
                dest,
                "writing the predictions",
                None,
                "an earlier OUTPUT_FILE there is untouched (the file is written whole or not at all)",
                "run the same command again",
            )
        ) from None
    log.info("wrote %d predictions to %s", len(items), dest)
    return dest


def run_predict(cfg: Config) -> None:
    """INPUT_FILE, else INTERACTIVE, else PROMPT or the built-in one: python -m app's commands each set
    these for their mode (app/cli/commands.py), and the pre-flight checked the one each needs."""
    pred = Predictor(cfg)
    if cfg.predict.input_file:
        predict_file(pred, cfg)
    elif cfg.predict.interactive:
        chat(pred)
    else:
        prompt = cfg.predict.prompt or BUILTIN_PROMPT
        messages = [{"role": "user", "content": prompt}]
        what = "PROMPT" if cfg.predict.prompt else "the built-in prompt"
        too_long = overflow(pred, messages, context_size(pred.model, pred.tokenizer), what)
        if too_long:  # else transformers only warns, and the model answers past what it can attend to
            raise UserError(f"{what} {too_long}")
        sys.stdout.write(f"prompt: {prompt}\n---\n")
        sys.stdout.flush()
        pred.generate(messages, stream=True)
