"""The tutorial way, as the reference for `make bench`: HF Trainer + PEFT LoRA, every sample padded
to MAX_SEQ_LEN, fp32, and plain one-prompt-at-a-time `generate`.

This is what the seed tutorials do (ChatGLM LoRA notebooks): tokenize prompt + answer + EOS, cut at
MAX_SEQ_LEN, pad to MAX_SEQ_LEN, labels -100 on the prompt and the padding, Trainer with its
defaults. It deliberately imports nothing from app/: it is the baseline the project is measured
against. bench/bench_speed.py runs it in its own process:

    python -m bench.reference_tutorial train --model M --data D --out O [--batch 4 --grad-accum 2 ...]
    python -m bench.reference_tutorial generate --model M --adapter O --data dev.jsonl --prompts 16

Each writes one JSON line of results (wall time, tokens, losses, peak RSS) to --result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))


def load_records(path: str, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit]


def prompt_of(tokenizer, context: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True
    )


def train(a: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    features, useful = [], 0
    for rec in load_records(a.data, a.samples):
        p = tok(prompt_of(tok, rec["context"]), add_special_tokens=False)["input_ids"]
        t = tok(rec["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = (p + t)[: a.max_seq_len], ([-100] * len(p) + t)[: a.max_seq_len]
        useful += len(ids)
        pad = a.max_seq_len - len(ids)
        features.append(
            {
                "input_ids": ids + [tok.pad_token_id] * pad,
                "labels": labels + [-100] * pad,
                "attention_mask": [1] * len(ids) + [0] * pad,
            }
        )
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=a.lora_r,
            lora_alpha=a.lora_alpha,
            lora_dropout=a.lora_dropout,
            target_modules=a.targets.split(","),
            task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=a.out,
        num_train_epochs=a.epochs,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=a.warmup_ratio,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=a.seed,
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=default_data_collator)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "seconds": seconds,
        "useful_tokens": useful * a.epochs,
        "padded_tokens": len(features) * a.max_seq_len * a.epochs,
        "steps": trainer.state.global_step,
        "train_loss": out.training_loss,
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
    }


def generate(a: argparse.Namespace) -> dict:
    """One prompt at a time, `model.generate` with its defaults (greedy, KV cache), fp32 + the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32), a.adapter
    ).eval()
    prompts = [prompt_of(tok, r["context"]) for r in load_records(a.data, a.prompts)]
    new_tokens, outputs = 0, []
    t0 = time.perf_counter()
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, enc["input_ids"].shape[1] :]
        new_tokens += int(new.numel())
        outputs.append(tok.decode(new, skip_special_tokens=True))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "new_tokens": new_tokens, "outputs": outputs, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("train", "generate"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="bench/results/reference")
    ap.add_argument("--adapter", default="")
    ap.add_argument("--result", required=True, help="write the results here (JSON)")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    a = ap.parse_args()
    result = train(a) if a.mode == "train" else generate(a)
    Path(a.result).write_text(json.dumps(result, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
