"""The model card (README.md) of the Hub registry repo: what the current version is, where it came from, why it passed.

    >>> print(model_card("me/flagloop-model", version, manifest, base_model="HuggingFaceTB/SmolLM2-135M-Instruct"))
    ---
    base_model: HuggingFaceTB/SmolLM2-135M-Instruct
    library_name: gguf
    ...
"""

from __future__ import annotations

from huggingface_hub import ModelCardData

from schemas.registry import GateReport, ModelVersion
from schemas.run import RunManifest

TAGS = ["flagloop", "gguf"]


def model_card(repo_id: str, version: ModelVersion, manifest: RunManifest | None = None,
               base_model: str | None = None) -> str:
    """README.md naming `version` as the current one: its file, its inputs, its metrics and gate report."""
    data = ModelCardData(base_model=base_model, library_name="gguf", tags=list(TAGS))
    v = version
    parts = [
        f"# {repo_id}: {v.version}",
        (
            "A GGUF chat model retrained by flagloop on reviewed corrections of its own answers. "
            f"`current.json` names the version being served: now **{v.version}**."
        ),
        _table(
            ["", ""],
            [
                ["version", f"`{v.version}` (tag `{v.version}`)"],
                ["file", f"`versions/{v.version}/{v.file}`"],
                ["quantization", v.quant],
                ["size", f"{v.bytes:,} bytes"],
                ["sha256", f"`{v.sha256}`"],
                ["base model sha256", f"`{v.base_sha256}`"],
                ["data revision", f"`{v.dataset_revision}`" if v.dataset_revision else "local feedback folder"],
                ["run", f"`{v.run_id}`" if v.run_id else "-"],
                ["published", v.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")],
            ],
        ),
    ]
    if manifest is not None:
        parts += ["## Run", _run_summary(manifest)]
    if v.metrics:
        parts += ["## Metrics", _table(["metric", "value"], [[k, _num(x)] for k, x in sorted(v.metrics.items())])]
    if v.gate is not None:
        parts += ["## Gate", _gate(v.gate)]
    parts += [
        "## Use",
        (
            "```python\nfrom huggingface_hub import hf_hub_download\nfrom llama_cpp import Llama\n\n"
            f'path = hf_hub_download("{repo_id}", "versions/{v.version}/{v.file}", revision="{v.version}")\n'
            "llm = Llama(model_path=path)\n```"
        ),
        "Each flag a flagloop app saves names the version that answered (`model.version`).",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n"


def _run_summary(m: RunManifest) -> str:
    t = m.settings.train
    counts = ", ".join(f"{k} {n}" for k, n in sorted(m.counts.items())) or "-"
    rows = [
        ["run id", f"`{m.run_id}`"],
        ["started", m.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")],
        ["base", f"`{m.base.path.rsplit('/', 1)[-1]}` ({m.base.quant}{', ' + m.base.version if m.base.version else ''})"],
        ["feedback", f"{len(m.feedback_files)} shard files" + (f" from `{m.dataset_repo}`" if m.dataset_repo else "")],
        ["accepted corrections", str(len(m.flag_ids))],
        ["rows", counts],
        ["LoRA", f"r {t.lora_r}, alpha {t.lora_alpha}, lr {t.learning_rate:g}, {t.max_steps} steps, seed {t.seed}"],
    ]
    if m.code_version:
        rows.append(["code", f"`{m.code_version}`"])
    return _table(["", ""], rows) + "\n\n`versions/<version>/manifest.json` pins the inputs and every setting."


def _gate(g: GateReport) -> str:
    verdict = "passed" if g.passed else "refused"
    rows = [
        ["held-out corrections score", _num(g.heldout_before), _num(g.heldout_after)],
        ["drift (rise of NLL/token on unrelated prompts)", "", _num(g.drift)],
    ]
    if g.heldout_answered is not None:
        rows.append(["held-out corrections the exported GGUF answers", "", f"{g.heldout_answered:.0%}"])
    if g.unrelated_changed is not None:
        rows.append(["unrelated greedy answers changed (vs the untrained GGUF)", "", f"{g.unrelated_changed:.0%}"])
    rows += [[k, "", _num(x)] for k, x in sorted(g.details.items()) if isinstance(x, (int, float, str))]
    return f"**{verdict}**: {g.reason}\n\n" + _table(["measure", "before", "after"], rows)


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])
