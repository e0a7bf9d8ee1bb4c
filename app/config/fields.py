"""The settings themselves: one frozen dataclass per section, one typed field per variable, each
with its default, help text and allowed values. The field name, upper-cased, *is* the variable name
(``max_seq_len`` <-> ``MAX_SEQ_LEN``); app.config.settings builds the tree and loads it.
Standard library only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from app.config.setting_names import Setting
from app.core.errors import UserError


class ConfigError(UserError):
    """Bad settings: one line per problem, each naming the variable and the fix."""


@dataclass(frozen=True)
class Range:
    """The bounds a number setting keeps (None: no such bound): validation, --help, docs/configuration.md and
    the web UI's forms read them from the field. ``note`` follows the bound in the error (what 0 means, an
    example)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def text(self, whole: bool) -> str:
        """What the value must be: '>= 1', '> 0', 'in [0, 1)', or 'in 0..65535' (whole numbers, both ends in)."""
        low = f"{self.ge}" if self.ge is not None else None if self.gt is None else f"{self.gt}"
        high = f"{self.le}" if self.le is not None else None if self.lt is None else f"{self.lt}"
        if low is None or high is None:
            op = ">=" if self.ge is not None else ">" if self.gt is not None else "<=" if self.le is not None else "<"
            return f"{op} {low or high}"
        if whole and self.ge is not None and self.le is not None:
            return f"in {low}..{high}"
        return f"in {'[' if self.ge is not None else '('}{low}, {high}{']' if self.le is not None else ')'}"

    def problem(self, var: str, value: float | None, whole: bool) -> str | None:
        """The one-line error for ``value`` outside the range, else None (None, an optional count's 'all', is in)."""
        ok = value is None or (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else f"{var}={value} must be {self.text(whole)}{self.note}"


def _f(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    note: str = "",
) -> Any:
    """A setting's default and help, and for a number the range it must be in (``ge``/``gt``/``le``/``lt``: >=, >,
    <=, <; ``note`` follows the bound in the error). Its allowed words, if any, are those of its Literal type."""
    meta: dict[str, Any] = {"help": help}
    if (ge, gt, le, lt) != (None, None, None, None):
        meta["range"] = Range(ge, gt, le, lt, note)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# The default model is a real GLM-family chat model that fits an 8 GB PC in 4-bit/8-bit and
# that transformers loads natively (no trust_remote_code).
DEFAULT_MODEL = "THUDM/glm-edge-1.5b-chat"
ALL = "all"  # how an optional count (int | None) spells None: MAX_SAMPLES=all
# The settings TIER=auto decides when you leave them unset (app/plan/tiers.py sets them; a test keeps this
# list equal to its tables), which the memory fit and the guard may change too: summary.json's "plan" records
# their final values, in this order. Their defaults below are what TIER=none runs with.
TIERED: tuple[Setting, ...] = (
    "QUANT_LEVEL",
    "MAX_SAMPLES",
    "MAX_SEQ_LEN",
    "BATCH_SIZE",
    "GRAD_ACCUM",
    "GRADIENT_CHECKPOINTING",
    "LORA_R",
)


# The settings that take one of a few words: their allowed values are these types' (validation,
# --help, .env.template and docs/configuration.md read them from the annotation).
DataFormat = Literal["auto", "context_target", "alpaca", "text", "messages", "sharegpt", "preference", "kto"]
Method = Literal["lora", "qlora", "ptuning", "full"]
TierName = Literal["auto", "none", "cpu-xs", "cpu-s", "cpu-m", "cpu-l", "gpu-s", "gpu-m", "gpu-l"]
QuantLevel = Literal["auto", "none", "8bit", "4bit"]
AutoOnOff = Literal["auto", "on", "off"]
MemoryGuard = Literal["backoff", "stop", "off"]
Scheduler = Literal["cosine", "linear", "constant_with_warmup"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
EvalMetric = Literal["loss", "f1"]
LoraInit = Literal["default", "gaussian", "pissa", "olora", "loftq"]
InferBackend = Literal["torch", "llama.cpp"]
Stage = Literal["sft", "dpo", "kto"]
PrefLoss = Literal["sigmoid", "ipo", "orpo", "simpo"]
# llama.cpp's own type names (its quantizer's), lower-cased: the float ones come from its converter
GgufQuant = Literal["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q3_k_m", "q2_k"]
# REPORT_TO's names (a comma list; app/training/trackers.py sets each up)
TRACKER_NAMES = ("tensorboard", "wandb", "mlflow", "trackio", "swanlab", "none")


@dataclass(frozen=True)
class ModelArgs:
    model_name: str = _f(
        DEFAULT_MODEL,
        "Hub name or local dir of the base model; 'tiny' (GLM), 'tiny-qwen2', "
        "'tiny-qwen3', 'tiny-llama', 'tiny-gemma3' build a random 2-layer model under models/ "
        "for offline runs",
    )
    trust_remote_code: bool = _f(False, "Allow the model repo's own Python code (ChatGLM-6B/2/3 need it)")
    num_threads: int = _f(0, "CPU threads for torch; 0 = all usable cores", ge=0, note=" (0 = all cores)")


@dataclass(frozen=True)
class DataArgs:
    data_path: str = _f("data/train.jsonl", "Training data: .jsonl/.json/.csv/.txt file, or a hub dataset name")
    val_path: str = _f("", "Validation file; empty = hold out VAL_SIZE of the training data")
    data_format: DataFormat = _f("auto", "Record format; auto detects it per file")
    max_samples: int | None = _f(
        None,
        "Use at most this many training records, sampled with SEED; all = every "
        "record (also when empty); records a tier leaves out are named in a warning",
        ge=1,
        note=", or MAX_SAMPLES=all for every record",
    )
    val_size: float = _f(
        0.1, "Held-out fraction when VAL_PATH is empty (at most 200 records)", ge=0, lt=1, note=", e.g. 0.1"
    )
    max_seq_len: int = _f(
        512, "Tokens per sample; longer prompts lose their middle, answers are kept", ge=16, note=", e.g. 512"
    )
    max_bad_ratio: float = _f(0.2, "Stop when more than this fraction of records is malformed", ge=0, le=1)
    cache_dir: str = _f(
        "models/.cache",
        "Token cache of MAX_SAMPLES=all .jsonl/.txt data, built once per file "
        "version and tokenizer (`make clean` removes models/.cache/tokens)",
    )
    num_proc: int = _f(
        0, "Worker processes that build the token cache; 0 = one per CPU", ge=0, note=" (0 = one worker per CPU)"
    )
    replace_data: bool = _f(
        False,
        "make data: overwrite existing files at DATA_PATH and the dev.jsonl beside it "
        "with sample data (without it, only missing files, or sample data this tool wrote "
        "and nobody changed, are written)",
    )


@dataclass(frozen=True)
class LoraArgs:
    lora_r: int = _f(8, "LoRA rank", ge=1, note=", e.g. 8")
    lora_alpha: int = _f(16, "LoRA scaling numerator (scale = LORA_ALPHA / LORA_R)", ge=1, note=", e.g. 2 x LORA_R")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA branch", ge=0, lt=1, note=", e.g. 0.05")
    lora_targets: list[str] = _f(
        [],
        "Comma-separated module names; empty = every linear projection "
        "of the model family; all-linear = PEFT's own choice of every linear "
        "layer but the output head",
    )
    use_dora: bool = _f(
        False,
        "DoRA: LoRA on each weight's direction plus a trained magnitude per output (PEFT "
        "use_dora; LLaMA-Factory use_dora); steps are slower",
    )
    lora_init: LoraInit = _f(
        "default",
        "How LoRA's A and B start: default = PEFT's (A Kaiming-uniform, B zero); "
        "gaussian (A Gaussian); pissa / olora (from the weight's principal "
        "singular vectors / QR; the base's weights change while training and the "
        "saved adapter is converted back to plain LoRA on the unchanged base); "
        "loftq (on a QUANT_LEVEL=4bit base: A and B absorb its quantization error)",
    )
    use_rslora: bool = _f(
        False,
        "rsLoRA: scale the update by LORA_ALPHA / sqrt(LORA_R) instead of / LORA_R (PEFT "
        "use_rslora), so high ranks keep learning",
    )
    method: Method = _f(
        "lora",
        "Tuning method: lora; qlora (LoRA on the 4-bit model); ptuning (P-Tuning v2 "
        "prefixes); full (every weight: small models only)",
    )
    pre_seq_len: int = _f(128, "METHOD=ptuning: number of trained prefix tokens per layer", ge=1, note=", e.g. 128")
    prefix_projection: bool = _f(False, "METHOD=ptuning: reparameterize prefixes through a 2-layer MLP")


@dataclass(frozen=True)
class ResourceArgs:
    tier: TierName = _f(
        "auto",
        "Resource tier: auto detects RAM/VRAM; a name forces one; none keeps the plain "
        "defaults. Variables you set always win over the tier",
    )
    quant_level: QuantLevel = _f("auto", "Weight quantization: auto = the tier's choice")
    gradient_checkpointing: AutoOnOff = _f(
        "auto", "Recompute activations in backward to save memory; auto = only when needed to fit"
    )
    memory_limit_mb: int = _f(
        0, "Treat this as the RAM (or VRAM) limit; 0 = detect (cgroup-aware)", ge=0, note=" (0 = detect)"
    )
    memory_safety: float = _f(
        0.85, "Plan for at most this fraction of the available memory", ge=0.1, le=1, note=", e.g. 0.85"
    )
    memory_guard: MemoryGuard = _f(
        "backoff",
        "Near the limit: checkpoint, then halve BATCH_SIZE and double GRAD_ACCUM "
        "(backoff), or checkpoint and stop (stop), or do nothing (off: also "
        "loads a model whose weights are predicted not to fit)",
    )
    release_memory: AutoOnOff = _f(
        "auto",
        "Return freed tensor memory to the OS at once (glibc mmap threshold "
        "256 KB): RSS stays at what is in use, but page faults cost up to 2x the "
        "step time of a small model; auto = only when the predicted peak is over "
        "half the memory budget, or on CUDA",
    )


@dataclass(frozen=True)
class TrainArgs:
    output_dir: str = _f(
        "",
        "Where the adapter, checkpoints, metrics and plot go: a new or empty folder, or a run "
        "this tool wrote (marked by run_manifest.json); empty = models/<last part of MODEL_NAME>-"
        "<METHOD>, plus -<STAGE> for dpo/kto and -<data file> when DATA_PATH is not the default (e.g. "
        "models/tiny-lora, models/tiny-lora-mine-train, models/tiny-lora-dpo-pref), so runs of "
        "different models, methods, stages or data never collide",
    )
    stage: Stage = _f(
        "sft",
        "What training learns from: sft (the answers as given); dpo (a chosen and a rejected "
        "answer per prompt, loss PREF_LOSS); kto (single answers labelled good or bad). dpo/kto "
        "train a new adapter on the base, or continue the SFT adapter in ADAPTER_DIR",
    )
    pref_loss: PrefLoss = _f(
        "sigmoid",
        "STAGE=dpo: sigmoid (DPO), ipo, orpo or simpo; orpo and simpo need no "
        "reference model (LLaMA-Factory pref_loss)",
    )
    pref_beta: float = _f(
        0.1,
        "STAGE=dpo/kto: the preference loss's beta: how far the policy may move from the "
        "reference (ORPO: the weight of its odds-ratio term)",
        gt=0,
        note=", e.g. 0.1",
    )
    pref_ftx: float = _f(
        0.0,
        "STAGE=dpo: weight of an SFT loss on the chosen answers added to the preference "
        "loss (sigmoid/ipo/simpo; ORPO always has it)",
        ge=0,
    )
    simpo_gamma: float = _f(0.5, "PREF_LOSS=simpo: the target reward margin", ge=0)
    kto_chosen_weight: float = _f(
        1.0, "STAGE=kto: weight of the good answers' loss (raise it when they are rarer)", ge=0
    )
    kto_rejected_weight: float = _f(1.0, "STAGE=kto: weight of the bad answers' loss", ge=0)
    num_epochs: float = _f(3.0, "Passes over the training data")
    max_steps: int = _f(
        0, "Stop after this many optimizer steps; 0 = run NUM_EPOCHS", ge=0, note=" (0 = use NUM_EPOCHS)"
    )
    batch_size: int = _f(1, "Micro-batch size per step", ge=1)
    grad_accum: int = _f(8, "Micro-batches per optimizer step (effective batch = BATCH_SIZE x GRAD_ACCUM)", ge=1)
    learning_rate: float = _f(2e-4, "Peak learning rate", gt=0, lt=1, note=", e.g. 2e-4")
    lr_scheduler: Scheduler = _f("cosine", "Learning-rate schedule after warmup")
    warmup_ratio: float = _f(0.05, "Fraction of steps spent warming up the learning rate", ge=0, lt=1)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping", ge=0, note=" (0 = no clipping)")
    precision: Precision = _f(
        "auto",
        "Compute precision: auto = bf16 autocast where the hardware has fast bf16 "
        "(a CPU with AVX512-BF16/AMX, a recent GPU), fp16 on older GPUs, else fp32; "
        "quantized CPU runs stay fp32 around their bf16 layers",
    )
    packing: AutoOnOff = _f(
        "auto",
        "Concatenate each micro-batch's samples into rows with no padding; each sample "
        "keeps its own positions, attention and label mask. auto = on where the model's "
        "code supports it (native GLM/Qwen/Llama/Gemma-3, not P-Tuning)",
    )
    torch_compile: bool = _f(
        False,
        "Compile the model with torch.compile (minutes of compiling first; pays off "
        "only on long runs; turns PACKING=auto off: compiled packed rows crash)",
    )
    neftune_alpha: float = _f(
        0.0,
        "NEFTune: uniform noise of this scale on the input embeddings while training "
        "(the Trainer's neftune_noise_alpha; 5 is the paper's); 0 = off",
        ge=0,
        note=" (0 = off, e.g. 5)",
    )
    report_to: list[str] = _f(
        ["tensorboard"],
        "Where metrics go besides metrics.jsonl, comma-separated: "
        "tensorboard (OUTPUT_DIR/runs), wandb, mlflow, trackio, swanlab, or "
        "none; offline unless their key or URI is set (pip install -r "
        "requirements-trackers.txt)",
    )
    optim: str = _f("adamw_torch", "Optimizer name as transformers knows it (paged_adamw_32bit needs CUDA)")
    save_steps: int = _f(50, "Checkpoint every N optimizer steps (a killed run loses at most these)", ge=1)
    eval_steps: int = _f(50, "Evaluate on the validation split every N optimizer steps", ge=1)
    logging_steps: int = _f(5, "Log loss / tokens per second every N optimizer steps", ge=1)
    early_stopping_patience: int = _f(0, "Stop after N evaluations without a better eval loss; 0 = never", ge=0)
    seed: int = _f(42, "Seed for sampling, splitting, LoRA init and data order")
    resume: str = _f(
        "auto",
        "Continue from a checkpoint (optimizer, scheduler, RNG, data position): auto = the "
        "newest complete one in OUTPUT_DIR/checkpoints, if any; or a checkpoint-N dir, or an "
        "output dir whose checkpoints/ holds one. Only with the model, data and optimizer "
        "settings it was trained with (a difference is refused, listed)",
    )
    overwrite: bool = _f(
        False,
        "Train into an OUTPUT_DIR that holds a finished run; the new run replaces it when "
        "it finishes (without this, such a run is refused). Over an unfinished run of other "
        "settings: train anew, removing its checkpoints",
    )


@dataclass(frozen=True)
class DistArgs:
    nproc: int = _f(
        1,
        "Training processes on this machine, launched by torchrun (gloo on CPU, nccl on CUDA with "
        "one GPU each); 1 = a plain single process",
        ge=1,
        note=" (processes on this machine)",
    )
    nnodes: int = _f(
        1,
        "Machines in a multi-node run: start the same command on each, with its own NODE_RANK",
        ge=1,
        note=" (machines)",
    )
    node_rank: int = _f(0, "This machine's index in a multi-node run, 0..NNODES-1 (node 0 hosts MASTER_ADDR)")
    master_addr: str = _f("127.0.0.1", "Address of node 0 that every node can reach (NNODES > 1)")
    master_port: int = _f(
        0,
        "Rendezvous port on node 0; 0 = a free port on one machine, 29500 across machines",
        ge=0,
        le=65535,
        note=" (0 = auto)",
    )
    ds_config: str = _f(
        "",
        "DeepSpeed JSON config on CUDA (pip install deepspeed), e.g. configs/ds_zero2.json or "
        "configs/ds_zero3.json; empty = plain DDP",
    )


@dataclass(frozen=True)
class PredictArgs:
    adapter_dir: str = _f("", "Adapter to load; empty = the last training's output; 'none' = base model only")
    prompt: str = _f("", "predict-custom: the prompt to answer (must not be blank)")
    input_file: str = _f("", "predict-file: one prompt or record per line (any DATA_FORMAT)")
    output_file: str = _f("", "File mode output (.jsonl); empty = <INPUT_FILE stem>.pred.jsonl")
    interactive: bool = _f(False, "predict INTERACTIVE=1 chats in the terminal until /exit or Ctrl-D (as `chat` does)")
    max_new_tokens: int = _f(256, "Tokens to generate per answer", ge=1)
    temperature: float = _f(0.0, "Sampling temperature; 0 = greedy (best for extraction)", ge=0, note=" (0 = greedy)")
    predict_batch_size: int = _f(
        8,
        "Prompts generated together in file mode, evaluation and F1 during training (left-padded, with the KV cache)",
        ge=1,
    )
    merged_dir: str = _f("", "make merge: where the standalone merged model goes; empty = merged/ in the adapter dir")
    onnx_dir: str = _f(
        "",
        "make export-onnx: where the ONNX export goes; empty = onnx/ in the merged dir "
        "(merging first if needed); predict on it with ADAPTER_DIR=<that dir>",
    )
    infer_backend: InferBackend = _f(
        "torch",
        "What runs predict, chat, evaluate and serve: torch (transformers, the "
        "adapter on its base) or llama.cpp (the run exported to GGUF at "
        "GGUF_QUANT, reused while the adapter is unchanged; make setup-gguf)",
    )
    gguf_quant: GgufQuant = _f(
        "q4_k_m",
        "make export-gguf / INFER_BACKEND=llama.cpp: the GGUF's weight type; "
        "f16/bf16 are exact, q8_0 near-exact, k-quants smaller and faster",
    )
    gguf_dir: str = _f(
        "", "make export-gguf: where the GGUF, its Ollama Modelfile and README go; empty = gguf/ in the adapter dir"
    )
    gguf_adapter_only: bool = _f(
        False,
        "make export-gguf: also write the LoRA alone as a GGUF adapter (llama.cpp "
        "--lora) beside its base converted once",
    )


@dataclass(frozen=True)
class EvalArgs:
    eval_path: str = _f(
        "",
        "Records to evaluate (any DATA_FORMAT); empty = the records the adapter's run held out "
        "(its VAL_PATH, or its validation split of DATA_PATH); with ADAPTER_DIR=none, VAL_PATH, "
        "else data/dev.jsonl",
    )
    eval_dir: str = _f("", "Where evaluation reports go; empty = eval/ in the adapter dir (or beside --predictions)")
    eval_metric: EvalMetric = _f("loss", "Choose the best checkpoint by eval loss, or by generated-triplet F1 (slower)")
    eval_samples: int = _f(0, "Evaluate at most this many records; 0 = all (F1 during training: 32)", ge=0)
    predictions: str = _f("", "Score this JSONL of {target, output} lines instead of generating (--predictions FILE)")
    demo_minutes: float = _f(15.0, "make demo: wall-clock training budget in minutes", gt=0)


@dataclass(frozen=True)
class ServeArgs:
    serve_host: str = _f(
        "127.0.0.1",
        "make serve: the address the API listens on; 127.0.0.1 = this machine only, "
        "0.0.0.0 = every interface (the container sets it behind a loopback port)",
    )
    serve_port: int = _f(8000, "make serve: the API's port", ge=1, le=65535, note=", e.g. 8000")
    adapters: str = _f(
        "",
        "make serve: the adapters to serve, comma-separated dirs or name=dir; empty = every "
        "trained run under models/; none = the base model only",
    )
    api_key: str = _f("", "make serve: when set, every /v1 request needs 'Authorization: Bearer <API_KEY>'")
    serve_max_queue: int = _f(32, "make serve: requests waiting beyond this many are answered 429 (busy)", ge=1)
    serve_batch_size: int = _f(
        8,
        "make serve: the most requests for the same adapter generated together; a "
        "request joins the running batch between decode steps while it has room",
        ge=1,
    )
    serve_batch_wait_ms: int = _f(
        20,
        "make serve: how long the first request of a new batch waits for others to "
        "start with (later ones join it as it runs)",
        ge=0,
        note=" (0 = no wait)",
    )
    serve_max_prompt_tokens: int = _f(2048, "make serve: a longer prompt is answered 400", ge=1)
    serve_max_tokens: int = _f(
        1024,
        "make serve: the most max_tokens a request may ask for (400 above it); a "
        "request without max_tokens gets MAX_NEW_TOKENS",
        ge=1,
    )
    serve_max_body_kb: int = _f(256, "make serve: a larger request body is answered 400", ge=1)


@dataclass(frozen=True)
class WebuiArgs:
    webui_host: str = _f(
        "127.0.0.1",
        "make webui: the address the web UI listens on; 127.0.0.1 = this machine only; "
        "any other address needs WEBUI_AUTH",
    )
    webui_port: int = _f(7860, "make webui: the web UI's port", ge=1, le=65535, note=", e.g. 7860")
    webui_auth: str = _f(
        "", "make webui: user:password that the browser must give (required unless WEBUI_HOST is a loopback address)"
    )
    webui_max_upload_mb: int = _f(
        512, "make webui: the largest data file an upload may be (a bigger one: copy it into data/ and pick it)", ge=1
    )
