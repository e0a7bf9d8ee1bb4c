"""`make export-gguf` and INFER_BACKEND=llama.cpp from the command line, on a tiny GLM run trained 2 steps:
the export's files, predict-file and evaluate answering as the torch backend does at f16, the export reused
while the adapter is unchanged, GGUF_ADAPTER_ONLY's adapter, remove-run taking gguf/ along, and each bad input
(an unsupported family, a P-Tuning run, a folder of yours, a disk too small, a damaged GGUF, an unknown
GGUF_QUANT) in one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app import Config, FineTuner


@pytest.fixture(scope="module")
def run(data_dir, tiny_glm_dir, tmp_path_factory, llamacpp) -> Path:
    """A LoRA run of the tiny GLM (2 steps), in a project dir of its own."""
    work = tmp_path_factory.mktemp("gguf-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        FineTuner(
            Config.from_dict(
                {
                    "MODEL_NAME": str(tiny_glm_dir),
                    "DATA_PATH": str(data_dir / "train.jsonl"),
                    "OUTPUT_DIR": "models/run",
                    "MAX_STEPS": 2,
                    "GRAD_ACCUM": 1,
                    "BATCH_SIZE": 2,
                    "TIER": "none",
                    "SEED": 0,
                    "VAL_SIZE": 0,
                    "MAX_SAMPLES": 8,
                    "LEARNING_RATE": 1e-2,
                    "QUANT_LEVEL": "none",
                }
            )
        ).run()
    return work / "models" / "run"


@pytest.fixture
def project(run, tmp_path, monkeypatch, cli) -> Path:
    """A fresh copy of the run's project dir as the working dir (each test may export into it)."""
    shutil.copytree(run.parent.parent, tmp_path / "p", symlinks=True)
    monkeypatch.chdir(tmp_path / "p")
    return tmp_path / "p"


def test_export_writes_the_gguf_modelfile_and_readme_into_the_run(project, cli):
    from gguf import GGUFReader

    code, errors, _ = cli("export-gguf", "GGUF_QUANT=q8_0")
    assert code == 0, errors
    out = project / "models/run/gguf"
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile",
        "README.md",
        "generation_config.json",
        "gguf_info.json",
        "model-q8_0.gguf",
    ]
    info = json.loads((out / "gguf_info.json").read_text())
    assert info["file"] == "model-q8_0.gguf" and info["size"] == (out / "model-q8_0.gguf").stat().st_size
    assert "gguf" in json.loads((project / "models/run/run_manifest.json").read_text())["entries"]
    meta = GGUFReader(out / "model-q8_0.gguf")
    tok_cfg = json.loads((project / "models/run/tokenizer_config.json").read_text())
    template = (
        (project / "models/run/chat_template.jinja").read_text()
        if not tok_cfg.get("chat_template")
        else tok_cfg["chat_template"]
    )
    assert meta.get_field("tokenizer.chat_template").contents() == template  # the run's, as trained
    assert meta.get_field("chatglm.context_length").contents() == 2048  # config.json's, not the converter's 64
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile and 'PARAMETER stop "<|user|>"' in modelfile
    assert "ollama create" in (out / "README.md").read_text()


def test_predict_file_and_evaluate_answer_as_torch_does_at_f16(project, cli, data_dir):
    lines = [json.loads(x) for x in (data_dir / "dev.jsonl").read_text().splitlines()[:4]]
    (project / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    outs = {}
    for backend in ("torch", "llama.cpp"):
        out = f"out-{backend}.jsonl"
        code, errors, _ = cli(
            "predict-file",
            "INPUT_FILE=in.jsonl",
            f"OUTPUT_FILE={out}",
            "MAX_NEW_TOKENS=24",
            f"INFER_BACKEND={backend}",
            "GGUF_QUANT=f16",
        )
        assert code == 0, errors
        outs[backend] = [json.loads(x)["output"] for x in (project / out).read_text().splitlines()]
    assert outs["llama.cpp"] == outs["torch"]
    reports = {}
    for backend in ("torch", "llama.cpp"):  # the answers, and the answers' loss from every position's logits
        code, errors, _ = cli(
            "evaluate",
            "EVAL_PATH=in.jsonl",
            f"EVAL_DIR=eval-{backend}",
            "MAX_NEW_TOKENS=24",
            f"INFER_BACKEND={backend}",
            "GGUF_QUANT=f16",
        )
        assert code == 0, errors
        reports[backend] = json.loads((project / f"eval-{backend}" / "report.json").read_text())
    assert reports["llama.cpp"]["loss"] == pytest.approx(reports["torch"]["loss"], rel=1e-3)
    assert reports["llama.cpp"]["triplet_f1"] == reports["torch"]["triplet_f1"]
    assert reports["llama.cpp"]["json_valid_rate"] == reports["torch"]["json_valid_rate"]


def test_the_export_is_reused_until_the_adapter_changes(project, cli, caplog):
    assert cli("predict-custom", "PROMPT=你好", "MAX_NEW_TOKENS=4", "INFER_BACKEND=llama.cpp")[0] == 0
    assert "exporting models/run to GGUF (q4_k_m)" in caplog.text
    caplog.clear()
    assert cli("predict-custom", "PROMPT=你好", "MAX_NEW_TOKENS=4", "INFER_BACKEND=llama.cpp")[0] == 0
    assert "exported earlier from this adapter and base" in caplog.text
    weights = project / "models/run/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes: still the same adapter
    caplog.clear()
    assert cli("predict-custom", "PROMPT=你好", "MAX_NEW_TOKENS=4", "INFER_BACKEND=llama.cpp")[0] == 0
    assert "exported earlier" in caplog.text
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights)  # trained further: exported again
    caplog.clear()
    assert cli("predict-custom", "PROMPT=你好", "MAX_NEW_TOKENS=4", "INFER_BACKEND=llama.cpp")[0] == 0
    assert "of another adapter, base or GGUF_QUANT" in caplog.text


def test_a_damaged_gguf_is_one_line_or_exported_again(project, cli, caplog):
    assert cli("export-gguf", "GGUF_QUANT=q8_0")[0] == 0
    gguf = project / "models/run/gguf/model-q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[:4] = b"XXXX"  # same size, not a GGUF
    gguf.write_bytes(bytes(data))
    code, errors, _ = cli("predict-custom", "PROMPT=你好", "INFER_BACKEND=llama.cpp", "GGUF_QUANT=q8_0")
    assert code == 2 and len(errors) == 1 and "does not load in llama.cpp" in errors[0], errors
    assert "make export-gguf" in errors[0]
    gguf.write_bytes(bytes(data[: len(data) // 2]))  # cut short: the size says so, and it is exported again
    caplog.clear()
    assert (
        cli("predict-custom", "PROMPT=你好", "MAX_NEW_TOKENS=4", "INFER_BACKEND=llama.cpp", "GGUF_QUANT=q8_0")[0] == 0
    )
    assert "is damaged" in caplog.text and "exporting it again" in caplog.text


def test_adapter_only_writes_the_lora_and_its_base_and_reuses_the_base(project, cli, caplog):
    code, errors, _ = cli("export-gguf", "GGUF_ADAPTER_ONLY=true", "GGUF_QUANT=q8_0")
    assert code == 0, errors
    out = project / "models/run/gguf"
    assert {"adapter-f16.gguf", "base-q8_0.gguf", "Modelfile"} <= {p.name for p in out.iterdir()}
    assert "ADAPTER ./adapter-f16.gguf" in (out / "Modelfile").read_text()
    assert "--lora adapter-f16.gguf" in (out / "README.md").read_text()
    inode = (out / "base-q8_0.gguf").stat().st_ino
    caplog.clear()
    assert cli("export-gguf", "GGUF_ADAPTER_ONLY=true", "GGUF_QUANT=q8_0")[0] == 0
    assert "reused from the previous export" in caplog.text and (out / "base-q8_0.gguf").stat().st_ino == inode


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_a_run_on_a_tiers_kbit_base_exports_from_the_original_base(
    quant, data_dir, tiny_glm_dir, tmp_path, cli, caplog
):
    """The tiers train on a bitsandbytes 8-bit (12-24 GB of RAM) or 4-bit (below 12 GB) base: its LoRA is merged
    into the original base instead, said in one line, and llama.cpp answers with it."""
    FineTuner(
        Config.from_dict(
            {
                "MODEL_NAME": str(tiny_glm_dir),
                "DATA_PATH": str(data_dir / "train.jsonl"),
                "OUTPUT_DIR": "models/run",
                "MAX_STEPS": 2,
                "GRAD_ACCUM": 1,
                "BATCH_SIZE": 2,
                "TIER": "none",
                "SEED": 0,
                "VAL_SIZE": 0,
                "MAX_SAMPLES": 8,
                "LEARNING_RATE": 1e-2,
                "QUANT_LEVEL": quant,
            }
        )
    ).run()
    code, errors, _ = cli("export-gguf", "GGUF_QUANT=q8_0")
    assert code == 0, errors
    assert f"the adapter was trained on a {quant} base; merging it into the original unquantized base" in caplog.text
    assert (tmp_path / "models/run/gguf/model-q8_0.gguf").is_file()
    code, errors, _ = cli(
        "predict-custom", "PROMPT=你好", "MAX_NEW_TOKENS=4", "INFER_BACKEND=llama.cpp", "GGUF_QUANT=q8_0"
    )
    assert code == 0 and "exported earlier from this adapter and base" in caplog.text, errors


def test_remove_run_takes_the_export_along(project, cli):
    assert cli("export-gguf", "GGUF_QUANT=q8_0")[0] == 0
    assert cli("remove-run", "OUTPUT_DIR=models/run")[0] == 0
    assert not (project / "models/run").exists()


def test_bad_input_is_one_line_and_writes_nothing(project, cli, snapshot, tiny_glm_dir, small_disk):
    mine = project / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes\n")
    ptuning = project / "models/pt"
    ptuning.mkdir()
    (ptuning / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PREFIX_TUNING", "base_model_name_or_path": str(tiny_glm_dir)})
    )
    import torch
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.zeros(4, 8)}, str(ptuning / "adapter_model.safetensors"))
    other = project / "models/phi"
    shutil.copytree(tiny_glm_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["Phi3ForCausalLM"]}))
    disk = small_disk("1m")
    before = snapshot(project)
    cases = {
        ("GGUF_DIR=mine",): "holds files this tool did not write",
        ("ADAPTER_DIR=models/pt",): "METHOD=ptuning",
        ("ADAPTER_DIR=none", f"MODEL_NAME={other}"): "Phi3ForCausalLM is not a family this tool exports",
        (f"GGUF_DIR={disk}/out",): "nothing was written",
        ("GGUF_QUANT=q9_k",): "GGUF_QUANT",
        ("MEMORY_LIMIT_MB=1",): "GGUF_ADAPTER_ONLY=true converts the base without loading it",
    }
    for args, says in cases.items():
        code, errors, _ = cli("export-gguf", *args)
        assert code == 2 and len(errors) == 1 and says in errors[0], (args, errors)
    assert snapshot(project) == before
    assert list(disk.iterdir()) == []
