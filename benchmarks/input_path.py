"""Training input-path benchmark: streamed feature shards vs the same examples in memory (issue 4, "Input").

Target (issue 4): the input path (Parquet parts + labels -> ``tf.data``) costs <= 5% over training from
in-memory arrays. Run on a quiet machine after ``benchmarks/quality.py --family classify`` has built the
corpus and its features::

    .venv/bin/python benchmarks/input_path.py              # 3 timed epochs per run, 5 runs per side (~4 min)
    .venv/bin/python benchmarks/input_path.py --with-val --sides streamed,memory,cached --repeats 3

Everything runs in one process on the classify corpus under ``benchmarks/.data/quality/classify``. Each run
builds a fresh classify model (``tasks.training._build``, same seed, normalisation statistics set as in
training), fits one warm-up epoch (tracing; not timed), then times ``model.fit`` for ``--epochs`` epochs.
The sides differ only in where the frames come from:

- **streamed**: ``tasks.training._datasets(spec, shards, target, target_spec)["train"]`` with
  ``cache_examples=False``: Parquet parts read every epoch -> ``from_generator`` -> shuffle -> bucketing.
- **memory**: the same ``_datasets`` call with ``iter_examples`` swapped for an iterator over a list of
  arrays read once beforehand, so shuffle, bucketing and padding are the same and so are the batches
  (same seed, same example order): only the Parquet reading and decoding are gone.
- **prebatched**: the batches of the memory side, padded and bucketed beforehand (one list per epoch,
  identical to what the other sides produce), fed one whole batch per step: no per-example Python at all.
- **cached**: the same ``_datasets`` call with ``cache_examples=True`` (``.cache()`` right after
  ``from_generator``; ``train_model``'s default): epoch 1 reads Parquet, later epochs read RAM. With a
  ``TrainSpec`` that has no ``cache_examples`` field, the benchmark inserts the ``.cache()`` itself.
- **repeat**: the streamed side with ``.repeat()`` and ``fit(steps_per_epoch=<batches per epoch>)``, so
  Keras keeps one iterator for the whole fit instead of a new one per epoch (no shuffle-buffer refill at
  each epoch start, no iterator teardown): what is left is the cost of reading Parquet itself.

Runs alternate between sides (a, b, c, a, b, c...) and the report takes the median seconds per epoch of
each side (``model.fit`` wall time / epochs). Each run also records the CPU time other processes used
meanwhile, to flag a run that shared the machine. The overhead is streamed / memory - 1 (the issue's
"training from in-memory arrays"); streamed / prebatched - 1 is printed as well. ``--with-val`` adds the
validation split to every fit (as ``train_model`` does), streamed or in memory to match the side. A
diagnostics pass times the pieces of one streamed epoch without a model (file read, Parquet decode, label
filter, ``features_to_numpy``) and each dataset alone. Output: a table, a markdown block for
``docs/benchmarks.md`` ("## Training input path") and ``benchmarks/.data/input-path-results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
CLASSIFY = HERE / ".data" / "quality" / "classify"
RESULTS_JSON = HERE / ".data" / "input-path-results.json"
SIDES = ("streamed", "memory", "prebatched", "cached", "repeat")
TARGET = 0.05


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- inputs
def find_inputs(root: Path) -> tuple[str, str, str]:
    """(features_url, config_hash, labels_url) of the featurized classify corpus under ``root``."""
    manifests = sorted(root.glob("**/manifest/config=*"))
    if len(manifests) != 1:
        sys.exit(f"expected one featurize output (manifest/config=*) under {root}, found {len(manifests)}; "
                 "run `benchmarks/quality.py --family classify` first.")
    labels = root / "corpus" / "labels" / "labels.parquet"
    if not labels.exists():
        sys.exit(f"no labels at {labels}")
    features_root = manifests[0].parent.parent
    return features_root.as_uri(), manifests[0].name.split("=", 1)[1], labels.as_uri()


@contextlib.contextmanager
def patched(module, name: str, value):
    """Swap ``module.name`` for ``value`` while ``_datasets`` binds it (it imports inside the function)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def to_dataset_cached(examples, num_bins, *, batch_size, target_spec, shuffle=0, seed=0, bucket_edges=(),
                      cache=True):
    """``models.data.to_dataset`` with ``.cache()`` after ``from_generator`` (for a ``models.data`` that
    predates its ``cache`` argument)."""
    import tensorflow as tf

    def gen():
        for frames, target in examples():
            yield {"features": frames, "lengths": np.int32(frames.shape[0])}, target

    spec = ({"features": tf.TensorSpec((None, num_bins), tf.float32), "lengths": tf.TensorSpec((), tf.int32)},
            target_spec)
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec).cache()
    if shuffle:
        ds = ds.shuffle(shuffle, seed=seed, reshuffle_each_iteration=True)
    if bucket_edges:
        ds = ds.bucket_by_sequence_length(lambda x, y: x["lengths"], list(bucket_edges),
                                          [batch_size] * (len(bucket_edges) + 1), pad_to_bucket_boundary=False)
    else:
        ds = ds.padded_batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)


class Inputs:
    """The classify corpus, its training spec, and each side's train (and val) datasets."""

    def __init__(self, batch_size: int, seed: int):
        from audiopipe.infra.storage import StorageSpec
        from audiopipe.models.data import iter_examples, norm_stats, open_shard_set
        from audiopipe.tasks.training import TrainSpec, _targets

        features_url, config_hash, labels_url = find_inputs(CLASSIFY)
        fields = {f.name: f for f in dataclasses.fields(TrainSpec)}
        self.default_cache = fields["cache_examples"].default if "cache_examples" in fields else False
        # The quality benchmark's classify settings (batch 32, lr 2e-3); the streamed path: no cache.
        self.spec = TrainSpec(family="classify", features_url=features_url, labels_url=labels_url,
                              registry_url=(HERE / ".data" / "input-path-registry").as_uri(),
                              config_hash=config_hash, batch_size=batch_size, learning_rate=2e-3, seed=seed,
                              **({"cache_examples": False} if "cache_examples" in fields else {}))
        self.cached_spec = (dataclasses.replace(self.spec, cache_examples=True) if "cache_examples" in fields
                            else None)
        self.storage = StorageSpec({})
        self.shards = open_shard_set(features_url, config_hash, labels_url, self.storage)
        self.target, self.target_spec, self.classes = _targets(self.spec, self.shards.labels)
        self.stats = norm_stats(self.shards, "train")
        started = time.perf_counter()
        # np.array copies each row out of its part's flat buffer: independent arrays, like a list built in RAM.
        self.memory = {split: [(np.array(f), t) for f, t in iter_examples(self.shards, split, self.target)]
                       for split in ("train", "val")}
        self.load_s = time.perf_counter() - started
        self.frames = sum(f.shape[0] for f, _ in self.memory["train"])
        self.bytes = sum(f.nbytes for f, _ in self.memory["train"])
        self._prebatched: dict[str, list] = {}
        self.steps_per_epoch = 0  # train batches per epoch (bucketing makes it data-dependent)

    def count_steps(self) -> None:
        self.steps_per_epoch = sum(1 for _ in self.datasets("memory")["train"])

    def datasets(self, side: str) -> dict:
        import audiopipe.models.data as data
        from audiopipe.tasks.training import _datasets

        if side == "streamed":
            return _datasets(self.spec, self.shards, self.target, self.target_spec)
        if side == "cached":
            if self.cached_spec is not None:
                return _datasets(self.cached_spec, self.shards, self.target, self.target_spec)
            with patched(data, "to_dataset", to_dataset_cached):
                return _datasets(self.spec, self.shards, self.target, self.target_spec)
        if side == "memory":
            with patched(data, "iter_examples", lambda shards, split, target: iter(self.memory[split])):
                return _datasets(self.spec, self.shards, self.target, self.target_spec)
        if side == "prebatched":
            return {"train": self.prebatched("train"), "val": self.prebatched("val")}
        if side == "repeat":
            ds = _datasets(self.spec, self.shards, self.target, self.target_spec)
            return {**ds, "train": ds["train"].repeat()}
        raise ValueError(side)

    def batches_per_epoch(self, split: str, epochs: int) -> list[list]:
        """The batches one fresh memory-side dataset yields on each of ``epochs`` passes, as numpy."""
        import keras

        keras.utils.set_random_seed(self.spec.seed)  # the shuffle's permutations depend on the global seed too
        ds = self.datasets("memory")[split]
        return [[(x, y) for x, y in ds.as_numpy_iterator()] for _ in range(epochs)]

    def prepare_prebatched(self, epochs: int) -> None:
        """Pad and bucket beforehand: ``epochs`` passes over train (a reshuffle each) and one over val."""
        self._prebatched = {"train": self.batches_per_epoch("train", epochs),
                            "val": self.batches_per_epoch("val", 1)}

    def prebatched(self, split: str):
        """A dataset replaying the prepared batches, pass k of it yielding the k-th epoch's batches."""
        import tensorflow as tf

        per_epoch = self._prebatched[split]
        counter = {"epoch": 0}

        def gen():
            batches = per_epoch[counter["epoch"] % len(per_epoch)]
            counter["epoch"] += 1
            yield from batches

        x, y = per_epoch[0][0]
        spec = ({"features": tf.TensorSpec((None, None, x["features"].shape[-1]), tf.float32),
                 "lengths": tf.TensorSpec((None,), tf.int32)}, tf.TensorSpec((None,), tf.int32))
        return tf.data.Dataset.from_generator(gen, output_signature=spec).prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------------------------------------ timing
def one_run(inputs: Inputs, side: str, epochs: int, with_val: bool) -> dict:
    """Fresh model (same seed), one warm-up epoch, then ``epochs`` timed epochs of ``model.fit``."""
    import keras

    from audiopipe.models.layers import set_feature_stats
    from audiopipe.tasks.training import _build

    keras.utils.set_random_seed(inputs.spec.seed)
    model, _ = _build(inputs.spec, inputs.shards.num_bins, inputs.classes)
    set_feature_stats(model, np.asarray(inputs.stats.mean), np.asarray(inputs.stats.std))
    ds = inputs.datasets(side)
    val = ds["val"] if with_val else None
    epoch_s: list[float] = []
    start_s: list[float] = []  # epoch begin -> end of its first step: new iterator + shuffle-buffer fill

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()
            self.first = True

        def on_train_batch_end(self, batch, logs=None):
            if self.first:
                start_s.append(time.perf_counter() - self.t0)
                self.first = False

        def on_epoch_end(self, epoch, logs=None):
            epoch_s.append(time.perf_counter() - self.t0)

    steps = {"steps_per_epoch": inputs.steps_per_epoch} if side == "repeat" else {}
    started = time.perf_counter()
    model.fit(ds["train"], validation_data=val, epochs=1, verbose=0, **steps)
    warm_s = time.perf_counter() - started
    started = time.perf_counter()
    history = model.fit(ds["train"], validation_data=val, epochs=epochs, verbose=0, callbacks=[Clock()], **steps)
    fit_s = time.perf_counter() - started
    return {"side": side, "warmup_s": round(warm_s, 3), "fit_s": round(fit_s, 3),
            "s_per_epoch": round(fit_s / epochs, 4), "epoch_s": [round(s, 3) for s in epoch_s],
            "epoch_start_s": [round(s, 3) for s in start_s],
            "loss": [round(float(v), 5) for v in history.history["loss"]],
            "cpu_s": None}


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def timed_run(inputs: Inputs, side: str, epochs: int, with_val: bool) -> dict:
    cpu0, busy0 = time.process_time(), busy_cpu_s()
    run = one_run(inputs, side, epochs, with_val)
    run["cpu_s"] = round(time.process_time() - cpu0, 2)  # whole run, warm-up included
    # Busy CPU outside this process during the run: > ~1 s means something else ran beside it.
    run["others_cpu_s"] = round(max(0.0, busy_cpu_s() - busy0 - run["cpu_s"]), 2)
    return run


# ------------------------------------------------------------------------------------------- diagnostics
def diagnostics(inputs: Inputs) -> dict:
    """Where one streamed epoch's input time goes, with no model: pieces of ``iter_examples``, then each
    side's dataset iterated alone (the rate the pipeline can feed, vs what training consumes)."""
    import pyarrow.parquet as pq

    from audiopipe.infra.schemas import features_to_numpy
    from audiopipe.infra.storage import open_fs
    from audiopipe.models.data import iter_examples

    shards = inputs.shards
    fs, _ = open_fs(shards.protocol_root, shards.storage)
    t = {"cat_file": 0.0, "read_table": 0.0, "filter_take": 0.0, "features_to_numpy": 0.0}
    rows_read = rows_kept = 0
    for part in shards.parts:
        t0 = time.perf_counter()
        blob = fs.cat_file(part)
        t1 = time.perf_counter()
        table = pq.read_table(io.BytesIO(blob), columns=["source", "features"])
        t2 = time.perf_counter()
        sources = table["source"].to_pylist()
        keep = [i for i, s in enumerate(sources) if shards.labels.get(s, {}).get("split") == "train"]
        if keep:  # as iter_examples: a part with no row of the split is read, then skipped
            table = table.take(keep)
        t3 = time.perf_counter()
        if keep:
            features_to_numpy(table["features"], shards.num_bins)
        t4 = time.perf_counter()
        t["cat_file"] += t1 - t0
        t["read_table"] += t2 - t1
        t["filter_take"] += t3 - t2
        t["features_to_numpy"] += t4 - t3
        rows_read += len(sources)
        rows_kept += len(keep)
    out = {f"{k}_s": round(v, 3) for k, v in t.items()}
    out.update(parts=len(shards.parts), rows_read=rows_read, rows_kept=rows_kept,
               part_bytes=sum(fs.size(p) for p in shards.parts))
    started = time.perf_counter()
    n = sum(1 for _ in iter_examples(shards, "train", inputs.target))
    out["iter_examples_s"] = round(time.perf_counter() - started, 3)
    out["iter_examples_rows"] = n
    for side in ("streamed", "memory", "cached"):
        ds = inputs.datasets(side)["train"]
        passes = []
        for _ in range(2):
            started = time.perf_counter()
            for _batch in ds:
                pass
            passes.append(round(time.perf_counter() - started, 3))
        out[f"dataset_alone_{side}_s"] = passes  # pass 1, pass 2 (cached: pass 2 from RAM)
    return out


# ------------------------------------------------------------------------------------------------ report
def machine() -> dict:
    import keras
    import psutil
    import pyarrow
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpus": len(tf.config.list_physical_devices("GPU")), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__, "pyarrow": pyarrow.__version__,
            "numpy": np.__version__, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}


def summarise(runs: list[dict], sides: list[str]) -> dict:
    med = {s: statistics.median(r["s_per_epoch"] for r in runs if r["side"] == s) for s in sides}
    out = {"s_per_epoch": {s: round(v, 3) for s, v in med.items()},
           "warmup_s": {s: round(statistics.median(r["warmup_s"] for r in runs if r["side"] == s), 2)
                        for s in sides},
           "median_epoch_s": {s: round(statistics.median(x for r in runs if r["side"] == s for x in r["epoch_s"]), 3)
                              for s in sides},
           "epoch_start_s": {s: round(statistics.median(x for r in runs if r["side"] == s
                                                        for x in r["epoch_start_s"]), 3) for s in sides}}
    if "memory" in med:
        out["overhead_vs_memory"] = {s: round(med[s] / med["memory"] - 1, 4) for s in sides if s != "memory"}
    if "prebatched" in med:
        out["overhead_vs_prebatched"] = {s: round(med[s] / med["prebatched"] - 1, 4)
                                         for s in sides if s != "prebatched"}
    return out


def verdict(overhead: float) -> str:
    return f"**met** (<= {TARGET:.0%})" if overhead <= TARGET else f"**missed** (> {TARGET:.0%})"


def markdown(res: dict) -> str:
    m, a, inp, d = res["machine"], res["args"], res["inputs"], res.get("diagnostics", {})
    lines = ["## Training input path", "",
             f"Issue 4 target: streaming the feature shards and labels into `tf.data` costs <= {TARGET:.0%} "
             "over training from in-memory arrays. Run with "
             f"`python benchmarks/input_path.py --epochs {a['epochs']} --repeats {a['repeats']}"
             f"{' --with-val' if a['with_val'] else ''}`, all sides in one process, runs alternating "
             "between sides, medians reported.", "",
             f"Data: the quality benchmark's classify corpus, train split {inp['train_examples']} clips, "
             f"{inp['train_frames']:,} frames x {inp['num_bins']} bins ({inp['train_mb']:.0f} MB float32), "
             f"stored in {inp['parts']} Parquet parts ({inp['part_mb']:.0f} MB with val/test rows). "
             f"Model: the classify model (`tasks.training._build`), batch {a['batch_size']}, bucket edges "
             "200/400/800/1600 frames, shuffle 512; each run is a fresh model with seed "
             f"{a['seed']}, one untimed warm-up epoch, then {a['epochs']} timed epochs of `model.fit`"
             f"{' with the val split as validation_data' if a['with_val'] else ' (train split only)'}.", "",
             f"**Machine:** {m['cpu']}, {m['cores']} vCPUs, {m['memory_gb']} GiB RAM, "
             f"{'no GPU' if not m['gpus'] else str(m['gpus']) + ' GPU(s)'}; Python {m['python']}, "
             f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, pyarrow {m['pyarrow']}, numpy {m['numpy']}. "
             f"Load average at the end {m['loadavg_at_end']}; CPU used by other processes during the runs: "
             f"median {statistics.median(r['others_cpu_s'] for r in res['runs']):.1f} s, "
             f"max {max(r['others_cpu_s'] for r in res['runs']):.1f} s per run. Measured {res['measured']}.", "",
             "| side | frames come from | s / epoch (median) | runs (s / epoch) | median epoch | epoch start "
             "| warm-up epoch | vs memory | target |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    what = {"streamed": "`_datasets(...)['train']`, `cache_examples=False`: Parquet parts read every epoch",
            "memory": "same pipeline, `iter_examples` over a list of arrays in RAM",
            "prebatched": "batches padded and bucketed beforehand, one `yield` per batch",
            "cached": "`_datasets(...)['train']`, `cache_examples=True`: `.cache()` after `from_generator`"
                      + (" (training's default)" if inp.get("default_cache") else ""),
            "repeat": "streamed + `.repeat()`, `fit(steps_per_epoch=...)`: one iterator per fit"}
    s = res["summary"]
    for side in a["sides"]:
        runs = ", ".join(f"{r['s_per_epoch']:.2f}" for r in res["runs"] if r["side"] == side)
        ratio = s.get("overhead_vs_memory", {}).get(side)
        ratio_txt = "" if ratio is None else f"{ratio:+.1%}"
        tgt = verdict(ratio) if side in ("streamed", "cached", "repeat") and ratio is not None else ""
        lines.append(f"| {side} | {what[side]} | {s['s_per_epoch'][side]:.2f} | {runs} "
                     f"| {s['median_epoch_s'][side]:.2f} | {s['epoch_start_s'][side]:.2f} "
                     f"| {s['warmup_s'][side]:.1f} | {ratio_txt} | {tgt} |")
    lines += ["", "s / epoch: `model.fit` wall time / epochs (iterator teardown at the end of the fit included). "
              "Median epoch: the median single epoch as a Keras callback sees it. "
              "Epoch start: median seconds from an epoch's start to the end of its first step (Keras makes a "
              "new iterator each epoch, so the 512-example shuffle buffer refills before the first batch). "
              "Warm-up epoch: the untimed first epoch (tracing included; for `cached` it is the epoch that reads "
              "Parquet and fills the cache)."]
    if "cached" in s["warmup_s"] and "memory" in s["warmup_s"]:
        once = s["warmup_s"]["cached"] - s["warmup_s"]["memory"]
        lines += ["", f"`cached` pays its Parquet read once per fit: its first epoch took {once:+.1f} s over "
                  f"memory's, {once / s['s_per_epoch']['memory']:.1f} memory-epochs, so over an N-epoch fit it adds "
                  f"about {once / s['s_per_epoch']['memory']:.1f}/N epochs on top of the row above."]
    if "overhead_vs_prebatched" in s:
        pb = s["overhead_vs_prebatched"]
        lines += ["", "Against the prebatched side: " + ", ".join(f"{k} {v:+.1%}" for k, v in pb.items()) + "."]
    if d:
        lines += ["", f"Diagnostics, one pass over the train split with no model: `iter_examples` "
                  f"{d['iter_examples_s']:.2f} s for {d['iter_examples_rows']} clips (it reads all "
                  f"{d['rows_read']} rows of the {d['parts']} parts, keeps {d['rows_kept']}): file read "
                  f"{d['cat_file_s']:.2f} s, Parquet decode {d['read_table_s']:.2f} s, split filter + take "
                  f"{d['filter_take_s']:.2f} s, `features_to_numpy` {d['features_to_numpy_s']:.2f} s. "
                  "Datasets iterated alone (pass 1, pass 2): "
                  + ", ".join(f"{k} {d[f'dataset_alone_{k}_s'][0]:.2f}/{d[f'dataset_alone_{k}_s'][1]:.2f} s"
                              for k in ("streamed", "memory", "cached")) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run (after 1 warm-up epoch)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side, alternating between sides")
    parser.add_argument("--sides", default="streamed,memory,prebatched,cached,repeat",
                        help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-val", action="store_true", help="fit with the val split as validation_data")
    parser.add_argument("--skip-diagnostics", action="store_true")
    args = parser.parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := set(sides) - set(SIDES):
        parser.error(f"unknown sides {sorted(unknown)}")

    started = time.perf_counter()
    log("loading the corpus (labels, normalisation statistics, the in-memory copy)")
    inputs = Inputs(args.batch_size, args.seed)
    inputs.count_steps()
    if "prebatched" in sides:
        inputs.prepare_prebatched(args.epochs + 1)
    log(f"{len(inputs.memory['train'])} train clips, {inputs.frames} frames, {inputs.bytes / 2**20:.0f} MB "
        f"in RAM (read in {inputs.load_s:.2f} s)")
    diag = {} if args.skip_diagnostics else diagnostics(inputs)
    if diag:
        log(f"diagnostics: {diag}")
    runs = []
    for rep in range(args.repeats):
        for side in sides:  # a, b, c, a, b, c...
            run = timed_run(inputs, side, args.epochs, args.with_val)
            runs.append(run)
            log(f"run {rep + 1} {side:<10} {run['s_per_epoch']:.3f} s/epoch  epochs {run['epoch_s']}  "
                f"starts {run['epoch_start_s']}  "
                f"warm-up {run['warmup_s']:.1f} s  cpu {run['cpu_s']} s  others {run['others_cpu_s']} s  "
                f"loss {run['loss']}")
    from audiopipe.infra.storage import open_fs

    fs, _ = open_fs(inputs.shards.protocol_root, inputs.storage)
    res = {"measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "args": {**vars(args), "sides": sides},
           "inputs": {"train_examples": len(inputs.memory["train"]), "train_frames": inputs.frames,
                      "num_bins": inputs.shards.num_bins, "train_mb": inputs.bytes / 2**20,
                      "parts": len(inputs.shards.parts),
                      "part_mb": sum(fs.size(p) for p in inputs.shards.parts) / 2**20,
                      "memory_load_s": round(inputs.load_s, 3), "default_cache": inputs.default_cache},
           "runs": runs, "summary": summarise(runs, sides), "diagnostics": diag, "machine": machine(),
           "wall_s": round(time.perf_counter() - started, 1)}
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(res, indent=2))
    print()
    print(markdown(res))
    print()
    log(f"done in {res['wall_s']:.0f} s; results in {RESULTS_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
