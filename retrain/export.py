"""export: merged LoRA weights -> a GGUF with the serving file's metadata -> quantized, verified.

No llama.cpp checkout is needed: the gguf package writes the file and llama-cpp-python quantizes it.

1. ``merge_adapter``: the HF base in float32 with the PEFT LoRA merged in (``merge_and_unload``).
2. ``write_gguf``: every metadata key of the serving GGUF copied as is (tokenizer, chat template,
   rope, context length ...) except the few that describe the file's encoding; its tensors, in its
   order and under its names, filled from the merged weights (q/k rows permuted the way llama.cpp's
   ``convert_hf_to_gguf.py`` does); written as F32 or F16.
3. ``quantize``: ``llama_model_quantize`` to the serving file's type (or ``ExportConfig.quant``).
4. ``verify``: greedy answers of a GGUF in llama-cpp-python next to the merged PyTorch model's.
   The F32 file must give PyTorch's answers (else the conversion is broken and nothing is
   exported); the quantized file's match rate is recorded, not enforced (see ``verify``).
5. ``export``: all of it into ``<run>/export/``: ``model.gguf`` (written last, atomically) and
   ``export.json`` (inputs, sizes, sha256, timings, verification). Run again with the same
   inputs, it returns the finished export.

    >>> result = export(base, run_dir / "adapter", serving_gguf, run_dir / "export", ExportConfig(), probes)
    >>> result.quant, result.verify["float"].match_rate
    ('Q4_1', 1.0)

Re-quantizing the serving file's own (dequantized) weights gives back its tensors bit for bit, so
an export with a LoRA that changes nothing answers exactly like the serving file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from retrain.gguf_file import GGUFHeader, GGUFTensor
from retrain.gguf_file import read_gguf as read_header
from schemas.run import ExportConfig
from space.model import sha256_of

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama",)
FLOAT_TYPES = ("F32", "F16")
MODEL_FILE = "model.gguf"
REPORT_FILE = "export.json"
# Below this share of identical greedy answers, the float GGUF is not the PyTorch model: the
# conversion is broken (wrong names, permutation, tokenizer). A correct one matches every probe
# in practice; the margin is for a near-tie that llama.cpp's and torch's float sums break apart.
MIN_FLOAT_MATCH = 0.5
# Keys of the serving file that describe how *that* file is encoded, not the model: rewritten.
REWRITTEN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")
DROPPED_PREFIXES = ("split.", "quantize.imatrix.")  # shard layout, and how the serving file was quantized
# Tensors computed from the config, not trained: copied from the serving file.
COPIED_TENSORS = ("rope_freqs.weight",)


class ExportError(RuntimeError):
    """The export cannot go on; the message says what was wrong and what to do."""


# ---------------------------------------------------------------------------------------- merge


def read_gguf(path: Path) -> GGUFHeader:
    """The serving GGUF's header; ExportError when it is missing, not a GGUF, or corrupt."""
    return read_header(path, ExportError)


def merge_adapter(base: str | Path, adapter: Path | None):
    """(model, tokenizer): the HF base in float32 with the LoRA adapter merged in; ``adapter=None``: the base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise ExportError(
            f"{adapter} is not a PEFT adapter folder (no adapter_config.json): pass the run's adapter/ "
            "folder written by the train stage, or None to export the base"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        log.info("merging LoRA adapter %s into %s", adapter, base)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------ GGUF write


def permute(weights, n_head: int, n_head_kv: int | None):
    """q/k rows reordered for llama.cpp's rope, exactly as convert_hf_to_gguf.py's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama_tensors(model, header: GGUFHeader) -> dict:
    """llama.cpp tensor name -> float32 numpy array, from the HF model's weights."""
    import gguf

    n_blocks = int(header.get("llama.block_count"))
    n_head = int(header.get("llama.attention.head_count"))
    n_head_kv = int(header.get("llama.attention.head_count_kv", n_head))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    out = {}
    for hf_name, tensor in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            continue  # e.g. rotary inv_freq buffers: llama.cpp computes them
        data = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, n_head, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, n_head, n_head_kv)
        out[name] = data
    # Tied embeddings: the output layer is the embedding matrix (used only when the file has one).
    out.setdefault("output.weight", out.get("token_embd.weight"))
    return out


def copied_tensor(header: GGUFHeader, t: GGUFTensor):
    """An F32 tensor of the serving file itself (rope_freqs: made from the config, not trained)."""
    import numpy as np

    if t.ggml_type != 0:
        raise ExportError(f"serving GGUF tensor {t.name!r} is of ggml type {t.ggml_type}, not F32: cannot copy it")
    count = int(np.prod(t.shape))
    data = np.fromfile(header.path, dtype="<f4", count=count, offset=header.data_offset + t.offset)
    return data.reshape(t.shape)


def check_arch(header: GGUFHeader) -> str:
    """The serving file's architecture, or ExportError when the exporter cannot write it."""
    arch = header.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ExportError(
            f"serving GGUF {str(header.path)!r} has architecture {arch!r}; only {', '.join(SUPPORTED_ARCHS)} is "
            "supported now (its tensor names and q/k permutation are the ones this exporter knows)"
        )
    return arch


def write_gguf(model, serving_gguf: Path, out: Path, dtype: str = "F32") -> Path:
    """Write ``model`` as a GGUF shaped like ``serving_gguf``: its metadata, its tensor names and order."""
    import gguf
    import numpy as np
    from tqdm import tqdm

    if dtype not in FLOAT_TYPES:
        raise ExportError(f"write_gguf writes {' or '.join(FLOAT_TYPES)}, not {dtype!r}: quantize() the result")
    header = read_gguf(serving_gguf)
    arch = check_arch(header)
    weights = llama_tensors(model, header)
    names = {t.name for t in header.tensors}
    if "output.weight" not in names and not np.array_equal(weights["output.weight"], weights["token_embd.weight"]):
        raise ExportError(
            f"the model's output layer (lm_head) differs from its embeddings, but the serving GGUF "
            f"{str(serving_gguf)!r} ties them (it has no output.weight), so the trained lm_head would be lost: "
            "do not train lm_head (LoRA modules_to_save) for this model"
        )
    ftype = gguf.LlamaFileType.ALL_F32 if dtype == "F32" else gguf.LlamaFileType.MOSTLY_F16

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, arch)
    if "general.alignment" in header.metadata:
        writer.add_custom_alignment(int(header.get("general.alignment")))
    for key, (value, vtype, sub_type) in header.metadata.items():
        if key not in REWRITTEN_KEYS and not key.startswith(DROPPED_PREFIXES):
            writer.add_key_value(key, value, vtype, sub_type)
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for t in tqdm(header.tensors, desc="GGUF tensors", unit="tensor", leave=False):
        if t.name in COPIED_TENSORS:
            data = copied_tensor(header, t)
        elif t.name in weights and weights[t.name] is not None:
            data = weights[t.name]
        else:
            raise ExportError(
                f"serving GGUF tensor {t.name!r} has no counterpart in the model's weights: the base model "
                "is not the one the serving GGUF was made from; train on the serving GGUF's weights"
            )
        if data.shape != t.shape:
            raise ExportError(
                f"tensor {t.name!r} is {data.shape} in the model but {t.shape} in the serving GGUF: the base "
                "model is not the one the serving GGUF was made from; train on the serving GGUF's weights"
            )
        # As convert_hf_to_gguf.py: 1-D tensors (norms) stay F32 in an F16 file.
        if dtype == "F16" and data.ndim > 1:
            data = data.astype(np.float16)
        writer.add_tensor(t.name, np.ascontiguousarray(data, dtype=data.dtype))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return out


# -------------------------------------------------------------------------------------- quantize


def quant_names() -> dict[str, int]:
    """Quantization name (Q4_1, Q8_0, Q4_K_M, F16 ...) -> llama.cpp file type, from llama_cpp's constants."""
    import llama_cpp

    names = {}
    for attr in dir(llama_cpp):
        for prefix in ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"):
            if attr.startswith(prefix):
                names[attr.removeprefix(prefix)] = getattr(llama_cpp, attr)
    return names


def ftype_of(quant: str) -> int:
    """llama.cpp's file type for ``quant`` (case-insensitive), or ExportError listing the valid names."""
    names = quant_names()
    key = quant.strip().upper()
    if key not in names:
        raise ExportError(f"unknown quantization {quant!r}: use one of {', '.join(sorted(names))}")
    return names[key]


def quant_of(gguf_path: Path) -> str:
    """The quantization name of a GGUF from its general.file_type (Q4_1 for the embedded model)."""
    from space.model import FILE_TYPES

    file_type = read_gguf(gguf_path).get("general.file_type")
    if file_type is None:
        raise ExportError(f"{str(gguf_path)!r} has no general.file_type: set ExportConfig.quant (e.g. Q4_1)")
    if int(file_type) not in FILE_TYPES:
        raise ExportError(
            f"{str(gguf_path)!r} has general.file_type {int(file_type)}, which this llama-cpp-python does not "
            "know: set ExportConfig.quant (e.g. Q4_1)"
        )
    return FILE_TYPES[int(file_type)]


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> Path:
    """Quantize the F32/F16 GGUF ``src`` to ``dst`` as ``quant`` with llama.cpp's own quantizer."""
    import llama_cpp

    if not Path(src).is_file():
        raise ExportError(f"cannot quantize {str(src)!r}: no such file; write it with write_gguf first")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(quant)
    params.nthread = threads or 0  # 0: llama.cpp uses every core
    # llama.cpp logs a line per tensor through llama-cpp-python's logger: quiet unless asked.
    lib_log = logging.getLogger("llama-cpp-python")
    level = lib_log.level
    if not log.isEnabledFor(logging.DEBUG):
        lib_log.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        lib_log.setLevel(level)
    if rc != 0:
        raise ExportError(f"llama.cpp could not quantize {str(src)!r} to {quant} (it returned {rc}): is it a GGUF?")
    return Path(dst)


# ---------------------------------------------------------------------------------------- verify


@dataclass
class ProbeAnswer:
    """One probe's greedy answer from the GGUF and from the reference (the merged PyTorch model)."""

    prompt: str
    gguf: str
    reference: str

    @property
    def match(self) -> bool:
        return self.gguf == self.reference

    @property
    def agreement(self) -> float:
        """Share of the longer answer that both answers begin with (1.0: the same text)."""
        longest = max(len(self.gguf), len(self.reference))
        if longest == 0:
            return 1.0
        same = next((i for i, (a, b) in enumerate(zip(self.gguf, self.reference)) if a != b),
                    min(len(self.gguf), len(self.reference)))
        return same / longest


@dataclass
class VerifyResult:
    """A GGUF's greedy answers next to the merged PyTorch model's, on the same probes.

    ``exact_expected``: the file is F32/F16, so its answers should be PyTorch's (a mismatch is at
    best a near-tie that llama.cpp's and torch's float sums break apart, at worst a broken
    conversion; see ``verify``); for a quantized file the match rate and agreement are measures.
    """

    gguf: str
    quant: str
    answers: list[ProbeAnswer]
    exact_expected: bool

    @property
    def matches(self) -> int:
        return sum(a.match for a in self.answers)

    @property
    def match_rate(self) -> float:
        return self.matches / len(self.answers) if self.answers else 1.0

    @property
    def agreement(self) -> float:
        """Mean share of each answer that the GGUF and PyTorch agree on before they part."""
        return sum(a.agreement for a in self.answers) / len(self.answers) if self.answers else 1.0

    def to_json(self) -> dict:
        return {
            "gguf": self.gguf, "quant": self.quant, "exact_expected": self.exact_expected,
            "match_rate": self.match_rate, "agreement": round(self.agreement, 4), "matches": self.matches,
            "probes": len(self.answers), "answers": [{**asdict(a), "match": a.match} for a in self.answers],
        }

    @classmethod
    def from_json(cls, data: dict) -> VerifyResult:
        answers = [ProbeAnswer(a["prompt"], a["gguf"], a["reference"]) for a in data["answers"]]
        return cls(data["gguf"], data["quant"], answers, data["exact_expected"])


def chat(prompt: str, system_prompt: str = "") -> list[dict]:
    """A one-turn chat: the system prompt (when there is one), then the user's prompt."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": prompt}]


def gguf_answers(gguf: Path, prompts: list[str], max_new_tokens: int, threads: int | None = None,
                 system_prompt: str = "") -> list[str]:
    """Greedy answers of a GGUF in llama-cpp-python, through the chat template stored in the file."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                            verbose=False)
    answers = []
    try:
        for prompt in prompts:
            llama.reset()  # no prefix reuse from the previous probe: it changes the logits slightly
            # repeat_penalty=1.0: llama-cpp-python's default (1.1) would not be greedy decoding.
            out = llama.create_chat_completion(chat(prompt, system_prompt), temperature=0.0, repeat_penalty=1.0,
                                               max_tokens=max_new_tokens)
            answers.append(out["choices"][0]["message"]["content"] or "")
    finally:
        llama.close()
    return answers


def torch_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of a PyTorch model through its tokenizer's chat template."""
    import torch

    answers = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        for prompt in tqdm_(prompts, "PyTorch probes"):
            enc = tokenizer.apply_chat_template(chat(prompt), add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
            answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def tqdm_(items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False)


def verify(gguf: Path, model, tokenizer, prompts: list[str], max_new_tokens: int, *,
           reference: list[str] | None = None, threads: int | None = None) -> VerifyResult:
    """Greedy answers of ``gguf`` (llama-cpp-python) next to the merged PyTorch model's, probe by probe.

    A probe matches when both answers are the same text. That is the bar for an F32/F16 GGUF
    (``exact_expected``): it holds the PyTorch weights, so a wrong tensor name, permutation or
    tokenizer key shows up as different answers. A quantized GGUF cannot be held to it: Q4_1 moves
    every weight, and llama.cpp also rounds activations to 8 bits in quantized matmuls, so even the
    serving Q4_1 file answers unlike its own dequantized weights in PyTorch on most probes. So
    ``export`` checks the float GGUF it quantizes from against PyTorch, and only records the
    quantized file's match rate and agreement. That quantizing adds nothing beyond llama.cpp's
    own rounding is shown by re-exporting the base: it answers exactly like the serving file.
    ``reference``: the PyTorch answers to ``prompts``, when already computed.
    """
    gguf = Path(gguf)
    if reference is None:
        reference = torch_answers(model, tokenizer, prompts, max_new_tokens)
    got = gguf_answers(gguf, prompts, max_new_tokens, threads)
    quant = quant_of(gguf)
    return VerifyResult(str(gguf), quant, [ProbeAnswer(p, g, r) for p, g, r in zip(prompts, got, reference)],
                        exact_expected=quant in FLOAT_TYPES)


# ---------------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    """The exported GGUF and how it was made: what export.json holds."""

    path: str
    sha256: str
    bytes: int
    quant: str
    inputs: dict  # what the file was made from: an export with the same inputs is reused
    timings: dict[str, float] = field(default_factory=dict)
    verify: dict[str, VerifyResult] = field(default_factory=dict)  # "float": checked; "final": measured
    reused: bool = False  # True: an earlier export with the same inputs was returned

    def to_json(self) -> dict:
        data = asdict(self)
        data["verify"] = {k: v.to_json() for k, v in self.verify.items()}
        del data["reused"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> ExportResult:
        data = dict(data)
        data["verify"] = {k: VerifyResult.from_json(v) for k, v in data.get("verify", {}).items()}
        return cls(**data)


def adapter_sha256(adapter: Path | None) -> str | None:
    """One hash over the adapter's config and weights: what decides the merged model."""
    if adapter is None:
        return None
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (Path(adapter) / name).exists():
            h.update(name.encode() + b"\0" + sha256_of(Path(adapter) / name).encode())
    return h.hexdigest()


def read_result(out_dir: Path) -> ExportResult | None:
    """The export recorded in ``out_dir/export.json``, or None when there is none."""
    path = Path(out_dir) / REPORT_FILE
    if not path.exists():
        return None
    return ExportResult.from_json(json.loads(path.read_text(encoding="utf-8")))


def finished_export(out_dir: Path, inputs: dict) -> ExportResult | None:
    """The export already in ``out_dir`` when it was made from ``inputs`` and its file is intact."""
    final = Path(out_dir) / MODEL_FILE
    if not final.exists():
        return None
    try:
        result = read_result(out_dir)
    except (ValueError, KeyError, TypeError) as err:
        log.warning("ignoring unreadable %s (%s): exporting again", Path(out_dir) / REPORT_FILE, err)
        return None
    if result is None or result.inputs != inputs:
        return None
    if final.stat().st_size != result.bytes or sha256_of(final) != result.sha256:
        log.warning("%s does not match its export.json: exporting again", final)
        return None
    result.path = str(final)
    result.reused = True
    return result


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def torch_threads(threads: int | None):
    """Run torch on ``threads`` threads inside the block (None: leave it as it is)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Types that keep a LoRA's delta when the base weights were dequantized from the serving file.
KEEPS_DELTA = ("Q8_0", "F16", "BF16", "F32")


def default_quant(serving_quant: str, base_from_serving: bool) -> str:
    """The serving file's type, unless that would erase what was trained.

    Weights dequantized from a Q4_1 file lie exactly on Q4_1's grid: quantizing base + LoRA to Q4_1
    again rounds a small LoRA delta back onto the same grid points (measured on the embedded model:
    the re-quantized file answered like the base on 5 of 5 held-out facts that the F32, Q8_0,
    Q5_1 and Q4_K_M files all gave). So when the base was materialised from a quantized serving
    file, the default is Q8_0; a float base (an HF model) keeps the serving file's type.
    """
    serving_quant = serving_quant.strip().upper()
    if base_from_serving and serving_quant not in KEEPS_DELTA:
        return "Q8_0"
    return serving_quant


def export(base: str | Path, adapter: Path | None, serving_gguf: Path, out_dir: Path, cfg: ExportConfig,
           probes: list[str], *, threads: int | None = None, intermediate: str = "F32",
           base_from_serving: bool = False) -> ExportResult:
    """Merge, write, quantize and verify: ``out_dir/model.gguf`` and ``export.json``. Idempotent.

    The quantization is ``cfg.quant``, else ``default_quant`` of the serving file's (its own type,
    or Q8_0 when ``base_from_serving``: the base weights were dequantized from that very file). The first ``cfg.verify_probes``
    probes are answered greedily by the merged PyTorch model and by the float GGUF, which must
    agree on at least MIN_FLOAT_MATCH of them (else ExportError, and nothing is exported), and by
    the final file (recorded). ``threads``: CPU threads for torch and llama.cpp (None: their
    defaults). ``intermediate``: the float GGUF quantized from. F32 by default, so the merged
    weights are rounded once, by the quantizer; F16 halves the scratch space a big model needs
    (the embedded model's zero-LoRA export reproduces the serving tensors from either).
    """
    out_dir, serving_gguf = Path(out_dir), Path(serving_gguf)
    check_arch(read_gguf(serving_gguf))  # a wrong file fails here, before the slow work
    quant = (cfg.quant or default_quant(quant_of(serving_gguf), base_from_serving)).strip().upper()
    ftype_of(quant)
    if intermediate not in FLOAT_TYPES:
        raise ExportError(f"intermediate must be one of {', '.join(FLOAT_TYPES)}, not {intermediate!r}")
    prompts = list(probes[: cfg.verify_probes])
    inputs = {
        "base": str(base), "adapter": str(adapter) if adapter is not None else None,
        "adapter_sha256": adapter_sha256(adapter), "serving_gguf": str(serving_gguf),
        "serving_sha256": sha256_of(serving_gguf), "quant": quant, "probes": prompts,
        "max_new_tokens": cfg.verify_max_new_tokens,
    }
    previous = finished_export(out_dir, inputs)
    if previous is not None:
        log.info("%s is already exported from these inputs (sha256 %s…)", previous.path, previous.sha256[:12])
        return previous

    out_dir.mkdir(parents=True, exist_ok=True)
    final, final_tmp = out_dir / MODEL_FILE, out_dir / f"{MODEL_FILE}.tmp"
    float_type = quant if quant in FLOAT_TYPES else intermediate
    # A float target is written straight to the final file: there is nothing to quantize.
    float_path = final_tmp if quant in FLOAT_TYPES else out_dir / f"intermediate.{float_type}.gguf"
    timings: dict[str, float] = {}
    checks: dict[str, VerifyResult] = {}
    try:
        with torch_threads(threads):
            t0 = time.perf_counter()
            log.info("export: merging %s + %s", base, adapter or "no adapter")
            model, tokenizer = merge_adapter(base, adapter)
            timings["merge_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            log.info("export: writing %s (%s, metadata of %s)", float_path.name, float_type, serving_gguf.name)
            write_gguf(model, serving_gguf, float_path, float_type)
            timings["write_gguf_s"] = time.perf_counter() - t0

            if float_path != final_tmp:
                t0 = time.perf_counter()
                log.info("export: quantizing to %s", quant)
                quantize(float_path, final_tmp, quant, threads)
                timings["quantize_s"] = time.perf_counter() - t0

            if prompts:
                t0 = time.perf_counter()
                checks = verify_export(model, tokenizer, float_path, final_tmp, prompts, cfg.verify_max_new_tokens,
                                       threads)
                timings["verify_s"] = time.perf_counter() - t0
            del model

        result = ExportResult(str(final), sha256_of(final_tmp), final_tmp.stat().st_size, quant, inputs,
                              {k: round(v, 3) for k, v in timings.items()}, checks)
        write_json_atomic(out_dir / REPORT_FILE, result.to_json())
        if float_path != final_tmp:
            float_path.unlink()
        os.replace(final_tmp, final)
    finally:  # after a failure: no half-written file left to mistake for an export
        float_path.unlink(missing_ok=True)
        final_tmp.unlink(missing_ok=True)
    log.info("exported %s (%s, %.1f MB, sha256 %s…)", final, quant, result.bytes / 1e6, result.sha256[:12])
    return result


def verify_export(model, tokenizer, float_path: Path, final_path: Path, prompts: list[str], max_new_tokens: int,
                  threads: int | None) -> dict[str, VerifyResult]:
    """The float GGUF checked against PyTorch (ExportError when it fails); the final file measured."""
    log.info("export: verifying on %d greedy probes", len(prompts))
    reference = torch_answers(model, tokenizer, prompts, max_new_tokens)
    checks = {"float": verify(float_path, model, tokenizer, prompts, max_new_tokens, reference=reference,
                              threads=threads)}
    if checks["float"].match_rate < MIN_FLOAT_MATCH:
        differ = "; ".join(f"{a.prompt!r}: GGUF {a.gguf!r}, PyTorch {a.reference!r}"
                           for a in checks["float"].answers if not a.match)
        raise ExportError(
            f"the {checks['float'].quant} GGUF answers unlike the merged PyTorch model on "
            f"{len(prompts) - checks['float'].matches} of {len(prompts)} probes ({differ}): the conversion is "
            "broken (tensor names, q/k permutation or tokenizer metadata); nothing was exported"
        )
    if final_path == float_path:
        checks["final"] = checks["float"]
    else:
        checks["final"] = verify(final_path, model, tokenizer, prompts, max_new_tokens, reference=reference,
                                 threads=threads)
    final = checks["final"]
    log.info("export: %s file answers %d of %d probes like PyTorch (agreement %.2f)", final.quant, final.matches,
             len(prompts), final.agreement)
    return checks
