"""Stage 5 of featurize: the run summary (table, markdown) and an HTML report with example spectrograms.

In: shard results and run timings; for the report, the published feature parts. Out: a ``RunSummary``
(printed by the CLI, published as a Prefect markdown artifact) and ``DIR/index.html`` + PNG files.
"""

from __future__ import annotations

import html
import io
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from audiopipe.tasks.extract import features_to_numpy
from audiopipe.tasks.features import FeatureConfig
from audiopipe.tasks.shards import OutputLayout


@dataclass
class RunSummary:
    """One featurize run in numbers. ``orchestration_share`` is the part of worker capacity
    (workers x processing wall time) not spent decoding and computing features."""

    files_listed: int = 0
    files_skipped: int = 0
    files_ok: int = 0
    files_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    shards_written: int = 0
    shards_failed: int = 0
    rows_written: int = 0
    audio_hours: float = 0.0
    startup_s: float = 0.0
    processing_s: float = 0.0
    wall_s: float = 0.0
    workers: int = 0
    busy_s: float = 0.0
    config_hash: str = ""
    reconciled: dict[str, int] = field(default_factory=dict)

    @property
    def x_realtime(self) -> float:
        return self.audio_hours * 3600 / self.wall_s if self.wall_s else 0.0

    @property
    def x_realtime_processing(self) -> float:
        return self.audio_hours * 3600 / self.processing_s if self.processing_s else 0.0

    @property
    def orchestration_share(self) -> float:
        capacity = self.workers * self.processing_s
        return max(0.0, 1.0 - self.busy_s / capacity) if capacity else 0.0

    def add_rejects(self, reasons: Counter) -> None:
        for reason, count in reasons.items():
            self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + count
        self.files_rejected += sum(reasons.values())

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for tables, in display order."""
        out = [("files listed", f"{self.files_listed}"),
               ("skipped (already done)", f"{self.files_skipped}"),
               ("ok", f"{self.files_ok}"),
               ("rejected", f"{self.files_rejected}")]
        out += [(f"  rejected: {reason}", f"{n}") for reason, n in sorted(self.rejected_by_reason.items())]
        out += [("audio hours", f"{self.audio_hours:.3f}"),
                ("wall time", f"{self.wall_s:.1f} s (start-up {self.startup_s:.1f} s)"),
                ("x real time (wall / processing)", f"{self.x_realtime:,.0f} / {self.x_realtime_processing:,.0f}"),
                ("workers", f"{self.workers}"),
                ("orchestration share", f"{self.orchestration_share:.0%}"),
                ("shards written / failed", f"{self.shards_written} / {self.shards_failed}"),
                ("feature rows written", f"{self.rows_written}"),
                ("config", self.config_hash)]
        return out

    def to_markdown(self) -> str:
        lines = ["# featurize summary", "", "| | |", "|---|---|"]
        lines += [f"| {label.strip()} | {value} |" for label, value in self.rows()]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(x_realtime=self.x_realtime, orchestration_share=self.orchestration_share)
        return data


def write_report(fs, layout: OutputLayout, cfg: FeatureConfig, summary: RunSummary, report_dir: Path,
                 max_examples: int = 4) -> Path:
    """Write ``report_dir/index.html`` with the summary and log-mel/MFCC images of a few segments.

    Returns:
        Path of the HTML file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # CJK file names in titles
    report_dir.mkdir(parents=True, exist_ok=True)
    parts = sorted(p for p in fs.find(layout.features_dir) if p.endswith(".parquet"))
    figures = []
    for path in parts:
        if len(figures) >= max_examples:
            break
        table = pq.read_table(io.BytesIO(fs.cat_file(path))).slice(0, max_examples - len(figures))
        for row, feats in zip(table.select(["source", "segment"]).to_pylist(),
                              features_to_numpy(table["features"], cfg.num_bins)):
            name = f"example-{len(figures)}.png"
            fig, ax = plt.subplots(figsize=(9, 3))
            image = ax.imshow(feats.T, origin="lower", aspect="auto", cmap="magma",
                              extent=(0, feats.shape[0] * cfg.hop_length / cfg.sample_rate, 0, cfg.num_bins))
            ax.set(xlabel="time in segment (s)", ylabel="mel band" if cfg.kind == "logmel" else "MFCC",
                   title=f"{row['source'].rsplit('/', 1)[-1]} · segment {row['segment']}")
            fig.colorbar(image, ax=ax, label="dB" if cfg.kind == "logmel" else "coefficient")
            fig.tight_layout()
            fig.savefig(report_dir / name, dpi=90)
            plt.close(fig)
            figures.append((name, row["source"]))
    table_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in summary.rows())
    images = "".join(f"<figure><img src='{n}'><figcaption>{html.escape(s)}</figcaption></figure>"
                     for n, s in figures)
    page = (f"<!doctype html><meta charset='utf-8'><title>audiopipe featurize report</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 12px}}img{{max-width:100%}}</style>"
            f"<h1>featurize report</h1><p>{cfg.kind}, config {cfg.config_hash}: "
            f"{html.escape(str(cfg.to_dict()))}</p><table>{table_rows}</table><h2>examples</h2>{images}")
    out = report_dir / "index.html"
    out.write_text(page, encoding="utf-8")
    return out
