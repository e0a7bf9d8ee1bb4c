"""The peer for the GPU speed figure of bench/bench_gpu.py: TRL 1.16's SFTTrainer as its documentation sets it up
for speed on one GPU, on the same model, data, LoRA and batch as the project's run.

TRL's fast path: a prompt-completion dataset (TRL applies the chat template and trains on the completion only),
bf16, packing with its best-fit-decreasing strategy, which turns on padding-free batches (position ids, no pad
tokens), and FlashAttention-2 where the `flash_attn` package is installed (else PyTorch's SDPA, the
documentation's fallback; the result names which). It imports nothing from app/: it is what a user of TRL would
run instead.

    python -m bench.reference_trl_sft --model M --data train.jsonl --out O --result r.json [--samples 2000 ...]

Writes one JSON object (training-loop seconds, tokens trained, losses, attention used) to --result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def records(path: str, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit]


def attention() -> str:
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def train(a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [
        {
            "prompt": [{"role": "user", "content": r["context"]}],
            "completion": [{"role": "assistant", "content": r["target"]}],
        }
        for r in records(a.data, a.samples)
    ]
    attn = attention()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, attn_implementation=attn)
    args = SFTConfig(
        output_dir=a.out,
        num_train_epochs=1,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # a ratio of the steps when below 1 (transformers 5)
        bf16=True,
        packing=True,  # bfd: padding-free rows of up to max_length tokens
        max_length=a.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=a.seed,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(
            r=a.lora_r,
            lora_alpha=2 * a.lora_r,
            lora_dropout=0.05,
            target_modules=a.targets.split(","),
            task_type="CAUSAL_LM",
        ),
    )
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "steps": trainer.state.global_step,
        "train_loss": out.training_loss,
        "losses": losses,
        "attention": attn,
        "peak_vram_mb": torch.cuda.max_memory_reserved() / 2**20,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    Path(a.result).write_text(json.dumps(train(a)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
