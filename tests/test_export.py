"""The export stage, with real PEFT, the real gguf package and real llama-cpp-python, on the embedded model.

Two LoRA adapters on SmolLM2-135M are made once for the module: a fresh one (B = 0, as PEFT
initialises it: it changes nothing) and the same one with B drawn at random (it changes answers).
The zero one is exported to Q4_1 like the serving file; the random one to F16 and F32.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import retrain.export as export_module
from retrain.export import (
    MODEL_FILE, REPORT_FILE, ExportError, export, gguf_answers, merge_adapter, quantize, verify,
    write_gguf,
)
from schemas.run import ExportConfig
from space.model import sha256_of

THREADS = 1  # on a shared 2-core machine, one thread each for torch and llama.cpp is faster than two
PROBES = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Name three primary colors.",
]
MAX_NEW = 16
CONFIG = ExportConfig(verify_probes=len(PROBES), verify_max_new_tokens=MAX_NEW)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, embedded_base):
    """(zero, random): a fresh PEFT LoRA on every linear layer, and the same with B ~ N(0, 0.01²)."""
    folder = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    peft_model.save_pretrained(folder / "zero")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    peft_model.save_pretrained(folder / "random")
    return folder / "zero", folder / "random"


@pytest.fixture(scope="module")
def zero_export(tmp_path_factory, embedded_base, embedded_gguf, adapters):
    """The zero LoRA exported with the defaults: quantized like the serving file."""
    return export(embedded_base, adapters[0], embedded_gguf, tmp_path_factory.mktemp("zero") / "export", CONFIG,
                  PROBES, threads=THREADS)


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory, embedded_base, embedded_gguf, adapters):
    """The random LoRA exported as F16."""
    cfg = CONFIG.model_copy(update={"quant": "F16"})
    return export(embedded_base, adapters[1], embedded_gguf, tmp_path_factory.mktemp("lora") / "export", cfg,
                  PROBES, threads=THREADS)


@pytest.fixture(scope="module")
def readers(embedded_gguf, zero_export):
    """gguf.GGUFReader (the gguf package's own reader, not ours) on the serving file and the zero export."""
    return gguf.GGUFReader(embedded_gguf), gguf.GGUFReader(zero_export.path)


def pytorch_answers(result) -> list[str]:
    return [a.reference for a in result.verify["float"].answers]


def test_zero_lora_export_answers_like_the_serving_gguf(zero_export, embedded_gguf):
    assert zero_export.quant == "Q4_1"
    serving = gguf_answers(embedded_gguf, PROBES, MAX_NEW, THREADS)
    exported = gguf_answers(zero_export.path, PROBES, MAX_NEW, THREADS)
    assert all(serving)
    assert exported == serving


def test_zero_lora_export_reproduces_the_serving_tensors(readers):
    # Why the answers are the same: Q4_1 (and Q8_0 for the embeddings) of the serving file's own
    # dequantized weights gives back its blocks bit for bit.
    serving, exported = readers
    theirs = {t.name: t for t in serving.tensors}
    assert sorted(theirs) == sorted(t.name for t in exported.tensors)
    for t in exported.tensors:
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        assert np.array_equal(t.data, theirs[t.name].data), t.name


def test_export_copies_the_serving_metadata(readers):
    serving, exported = readers
    for key in ("tokenizer.chat_template", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.eos_token_id", "llama.context_length",
                "llama.rope.freq_base", "general.name"):
        assert exported.fields[key].contents() == serving.fields[key].contents(), key
    assert set(exported.fields) == set(serving.fields)
    assert exported.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1


def test_lora_export_to_f16_answers_like_the_merged_pytorch_model(lora_export, zero_export):
    check = lora_export.verify["final"]
    assert check.quant == "F16" and check.exact_expected
    assert [a.gguf for a in check.answers] == pytorch_answers(lora_export)
    # The LoRA changes what the model says, so answering like it is not answering like the base.
    assert pytorch_answers(lora_export) != pytorch_answers(zero_export)


def test_lora_written_as_f32_answers_like_the_merged_pytorch_model(tmp_path, embedded_base, embedded_gguf,
                                                                    adapters, lora_export):
    model, tokenizer = merge_adapter(embedded_base, adapters[1])
    path = write_gguf(model, embedded_gguf, tmp_path / "lora.F32.gguf", "F32")
    # The merged model's PyTorch answers are the F16 export's reference: no need to generate them again.
    check = verify(path, model, tokenizer, PROBES, MAX_NEW, reference=pytorch_answers(lora_export), threads=THREADS)
    assert check.quant == "F32"
    assert [a.gguf for a in check.answers] == pytorch_answers(lora_export)


def test_export_json_records_the_file_and_its_checks(zero_export):
    folder = Path(zero_export.path).parent
    report = json.loads((folder / REPORT_FILE).read_text())
    assert sorted(p.name for p in folder.iterdir()) == [REPORT_FILE, MODEL_FILE]  # no intermediate left
    assert report["sha256"] == sha256_of(folder / MODEL_FILE) == zero_export.sha256
    assert report["bytes"] == (folder / MODEL_FILE).stat().st_size
    assert report["quant"] == "Q4_1"
    assert set(report["timings"]) == {"merge_s", "write_gguf_s", "quantize_s", "verify_s"}
    assert report["verify"]["float"]["quant"] == "F32"
    assert report["verify"]["float"]["match_rate"] == 1.0
    assert report["verify"]["final"]["quant"] == "Q4_1"
    assert len(report["verify"]["final"]["answers"]) == len(PROBES)


def test_export_again_returns_the_finished_export(zero_export, embedded_base, embedded_gguf, adapters):
    path = Path(zero_export.path)
    mtime = path.stat().st_mtime_ns
    again = export(embedded_base, adapters[0], embedded_gguf, path.parent, CONFIG, PROBES, threads=THREADS)
    assert again.reused and again.sha256 == zero_export.sha256
    assert path.stat().st_mtime_ns == mtime


def test_export_refuses_a_gguf_that_answers_unlike_pytorch(tmp_path, embedded_base, embedded_gguf, adapters,
                                                           monkeypatch):
    # A conversion bug (q/k rows left in HF order) must stop the export, not ship a broken model.
    monkeypatch.setattr(export_module, "permute", lambda weights, n_head, n_head_kv: weights)
    cfg = CONFIG.model_copy(update={"verify_probes": 1})
    with pytest.raises(ExportError, match="answers unlike the merged PyTorch model"):
        export(embedded_base, adapters[1], embedded_gguf, tmp_path / "export", cfg, PROBES, threads=THREADS)
    assert list((tmp_path / "export").iterdir()) == []


def test_unknown_quant_name_is_refused_with_the_valid_names(tmp_path, embedded_base, embedded_gguf):
    with pytest.raises(ExportError, match=r"unknown quantization 'Q9_9'.*Q4_1.*Q8_0"):
        quantize(embedded_gguf, tmp_path / "out.gguf", "Q9_9")
    with pytest.raises(ExportError, match="unknown quantization 'Q9_9'"):
        export(embedded_base, None, embedded_gguf, tmp_path / "export", ExportConfig(quant="Q9_9"), PROBES)
    assert not (tmp_path / "export").exists()


def test_quantize_fails_clearly_on_a_file_llama_cpp_cannot_read(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ExportError, match="llama.cpp could not quantize"):
        quantize(broken, tmp_path / "out.gguf", "Q4_1")


def test_a_serving_file_that_is_not_gguf_is_refused(tmp_path, embedded_base):
    serving = tmp_path / "model.gguf"
    serving.write_text("<html>404 Not Found</html>")
    with pytest.raises(ExportError, match=r"model\.gguf' is not a GGUF"):
        export(embedded_base, None, serving, tmp_path / "export", CONFIG, PROBES)
    assert not (tmp_path / "export").exists()


def test_an_architecture_other_than_llama_is_refused(tmp_path, embedded_base):
    serving = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(serving, "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ExportError, match="architecture 'qwen2'; only llama is supported"):
        export(embedded_base, None, serving, tmp_path / "export", ExportConfig(quant="Q4_1"), PROBES)


def test_default_quant_keeps_a_lora_that_requantizing_to_the_serving_grid_would_erase():
    from retrain.export import default_quant

    # Base weights dequantized from a Q4_1 file sit on Q4_1's grid: exporting to Q4_1 again snaps
    # the trained delta back onto it (the loop test's facts vanished), so the default is Q8_0.
    assert default_quant("Q4_1", base_from_serving=True) == "Q8_0"
    assert default_quant("q4_k_m", base_from_serving=True) == "Q8_0"
    assert default_quant("Q8_0", base_from_serving=True) == "Q8_0"
    assert default_quant("F16", base_from_serving=True) == "F16"
    # A float HF base has no grid to snap back to: the serving file's type is kept.
    assert default_quant("Q4_1", base_from_serving=False) == "Q4_1"
