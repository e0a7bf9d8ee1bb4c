"""The peer for bench/bench_dpo.py: TRL 1.16's DPOTrainer as its documentation sets it up, on the same model,
pairs and effective batch as `python -m app train STAGE=dpo`.

Documented defaults kept: DPOConfig's own (gradient checkpointing on, bf16 on, dropout off, max_length 1024,
padded batches, the reference = the adapter turned off), a LoraConfig passed as ``peft_config``, and the
conversational dataset form (TRL applies the chat template). Set to match the tool's run: the learning rate,
batch, accumulation, steps, seed and LoRA shape. Writes one JSON result: seconds, non-padding tokens seen,
tokens/s, peak RSS. Run by bench/bench_dpo.py in its own process.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("--model", "--data", "--out", "--result", "--targets"):
        ap.add_argument(name, required=True)
    for name in ("--batch", "--grad-accum", "--steps", "--threads", "--lora-r", "--lora-alpha"):
        ap.add_argument(name, type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(a.threads)
    rows = [json.loads(line) for line in Path(a.data).read_text(encoding="utf-8").splitlines()]
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    args = DPOConfig(
        output_dir=a.out,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=a.grad_accum,
        max_steps=a.steps,
        learning_rate=a.lr,
        seed=42,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        include_num_input_tokens_seen="non_padding",
    )
    peft = LoraConfig(
        r=a.lora_r,
        lora_alpha=a.lora_alpha,
        lora_dropout=0.05,
        target_modules=a.targets.split(","),
        task_type="CAUSAL_LM",
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    tokens = trainer.state.num_input_tokens_seen
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    Path(a.result).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "tokens_seen": tokens,
                "tokens_per_s": tokens / seconds,
                "losses": losses,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "settings": {
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "bf16": args.bf16,
                    "max_length": args.max_length,
                    "disable_dropout": args.disable_dropout,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
