"""Infra: the versioned data contracts (Arrow schemas) and their validator.

Documented in ``docs/data-contracts.md``. Changing a schema means a new ``*_V2`` constant, a docs entry,
and readers that list the versions they accept. Writers call ``validate_table`` before publishing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from audiopipe.infra.errors import SchemaError

CONTRACT_VERSION = 1

# One row per (recording, segment). ``features`` is frames x bins, float32; ``n_frames`` repeats the
# outer length so metadata readers never touch the payload column.
FEATURES_V1 = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("n_frames", pa.int32(), nullable=False),
        pa.field("features", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
    ],
    metadata={"audiopipe.contract": "features", "audiopipe.contract_version": str(CONTRACT_VERSION)},
)

# One row per input file, rejected ones included: the account of every input.
MANIFEST_V1 = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("mtime", pa.timestamp("us", tz="UTC")),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("sample_rate", pa.int32()),
        pa.field("channels", pa.int32()),
        pa.field("duration_s", pa.float64()),
        pa.field("n_segments", pa.int32(), nullable=False),
        pa.field("shard", pa.string()),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("audiopipe_version", pa.string(), nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"audiopipe.contract": "manifest", "audiopipe.contract_version": str(CONTRACT_VERSION)},
)

MANIFEST_STATUSES = ("ok", "rejected")


def _results_schema(name: str, fields: list[pa.Field], version: int = CONTRACT_VERSION) -> pa.Schema:
    """A bulk-inference result table: its own columns, then the model version that produced the row."""
    model = [pa.field("model", pa.string(), nullable=False), pa.field("model_version", pa.int32(), nullable=False)]
    return pa.schema([pa.field("source", pa.string(), nullable=False), *fields, *model],
                     metadata={"audiopipe.contract": name, "audiopipe.contract_version": str(version)})


_WORD = pa.struct([pa.field("word", pa.string()), pa.field("start_s", pa.float64()),
                   pa.field("end_s", pa.float64()), pa.field("confidence", pa.float32())])
_CLASS_PROB = pa.struct([pa.field("label", pa.string()), pa.field("p", pa.float32())])

# `audiopipe transcribe`: one row per speech segment (words between pauses), times in seconds of the recording.
_TRANSCRIPT_FIELDS = [
    pa.field("segment", pa.int32(), nullable=False),
    pa.field("start_s", pa.float64(), nullable=False),
    pa.field("end_s", pa.float64(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("confidence", pa.float32(), nullable=False),
    pa.field("words", pa.list_(_WORD), nullable=False),
]
TRANSCRIPTS_V1 = _results_schema("transcripts", _TRANSCRIPT_FIELDS)
# V2 (written since `transcribe --channels/--gate`): V1 plus ``channel``, the input channel a segment was heard
# on (``--channels split``), null where the channels were mixed down (``--channels mix``, the default), and
# ``gated_as``: the class of audio not transcribed (``--gate``: "music", "silence"...; text empty), else null.
TRANSCRIPTS_V2 = _results_schema("transcripts", [*_TRANSCRIPT_FIELDS, pa.field("channel", pa.int32()),
                                                 pa.field("gated_as", pa.string())], version=2)
TRANSCRIPTS_ACCEPTED = (TRANSCRIPTS_V1, TRANSCRIPTS_V2)  # what ``transcripts_as_v2`` reads
# `audiopipe classify`: one row per window (the model's feature segment) ...
CLASS_SEGMENTS_V1 = _results_schema("class_segments", [
    pa.field("segment", pa.int32(), nullable=False),
    pa.field("start_s", pa.float64(), nullable=False),
    pa.field("end_s", pa.float64(), nullable=False),
    pa.field("top_class", pa.string(), nullable=False),
    pa.field("top_p", pa.float32(), nullable=False),
    pa.field("probabilities", pa.list_(_CLASS_PROB), nullable=False),
])
# ... and one per recording: the windows' probabilities averaged, weighted by their duration.
CLASS_RECORDINGS_V1 = _results_schema("class_recordings", [
    pa.field("duration_s", pa.float64(), nullable=False),
    pa.field("top_class", pa.string(), nullable=False),
    pa.field("top_p", pa.float32(), nullable=False),
    pa.field("probabilities", pa.list_(_CLASS_PROB), nullable=False),
])
# `audiopipe separate`: one row per stem written (FLAC under ``audio/``).
STEMS_V1 = _results_schema("stems", [
    pa.field("stem", pa.string(), nullable=False),
    pa.field("url", pa.string(), nullable=False),
    pa.field("duration_s", pa.float64(), nullable=False),
    pa.field("sample_rate", pa.int32(), nullable=False),
])


def validate_table(table: pa.Table | pa.RecordBatch, schema: pa.Schema) -> None:
    """Raise ``SchemaError`` unless ``table`` has exactly ``schema``'s fields, types and non-null columns.

    Args:
        table: The table or batch about to be written.
        schema: One of the ``*_V1`` constants.

    Raises:
        SchemaError: naming the contract and the first mismatching field.
    """
    contract = (schema.metadata or {}).get(b"audiopipe.contract", b"?").decode()
    if table.schema.names != schema.names:
        raise SchemaError(f"{contract} table has columns {table.schema.names}, contract wants {schema.names}")
    for field in schema:
        got = table.schema.field(field.name).type
        if got != field.type:
            raise SchemaError(f"{contract} column {field.name!r} is {got}, contract wants {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"{contract} column {field.name!r} has nulls but the contract forbids them")
    if schema is MANIFEST_V1:
        bad = set(table.column("status").to_pylist()) - set(MANIFEST_STATUSES)
        if bad:
            raise SchemaError(f"manifest status has values {sorted(bad)}, allowed {MANIFEST_STATUSES}")


def transcripts_as_v2(table: pa.Table) -> pa.Table:
    """Read transcripts of either contract version (``TRANSCRIPTS_ACCEPTED``) as V2: a V1 table (written
    before ``--channels``/``--gate``: mixed down, nothing gated) gains null ``channel`` and ``gated_as``.

    Raises:
        SchemaError: the table is neither TRANSCRIPTS_V1 nor TRANSCRIPTS_V2.
    """
    if table.schema.names == TRANSCRIPTS_V1.names:
        validate_table(table, TRANSCRIPTS_V1)
        for name in ("channel", "gated_as"):
            field = TRANSCRIPTS_V2.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        table = table.select(TRANSCRIPTS_V2.names)
    elif table.schema.names != TRANSCRIPTS_V2.names:
        raise SchemaError(f"not a transcripts table of an accepted version (V1, V2): columns {table.schema.names}")
    validate_table(table, TRANSCRIPTS_V2)
    return table.replace_schema_metadata(TRANSCRIPTS_V2.metadata)

# One row per file that `audiopipe synth` writes (audio or MIDI), keyed by the same ``source`` URL as the
# manifest. Documented in docs/data-contracts.md ("LABELS_V1"); allowed values of the categorical columns are
# ``LABELS_KINDS``, ``LABELS_MEDIA`` and ``LABELS_SPLITS`` (checked by ``audiopipe.tasks.corpora.labels_table``).
LABELS_V1 = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("media", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("text", pa.string()),
        pa.field("voice", pa.string()),
        pa.field("engine", pa.string(), nullable=False),
        pa.field("augment", pa.list_(pa.string()), nullable=False),
        pa.field("snr_db", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("sample_rate", pa.int32()),
        pa.field("stems", pa.string()),
        pa.field("midi", pa.string()),
        pa.field("note_pitches", pa.list_(pa.int16())),
        pa.field("note_durations_ql", pa.list_(pa.float32())),
        pa.field("params", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
    ],
    metadata={"audiopipe.contract": "labels", "audiopipe.contract_version": str(CONTRACT_VERSION)},
)

LABELS_KINDS = ("speech", "sounds", "music", "mixtures")
LABELS_MEDIA = ("audio", "midi")
LABELS_SPLITS = ("train", "val", "test")


def features_to_numpy(features: pa.Array | pa.ChunkedArray, num_bins: int) -> list[np.ndarray]:
    """Read a ``features`` column back into one ``(num_frames, num_bins)`` array per row, loop-free inside rows."""
    if isinstance(features, pa.ChunkedArray):
        features = features.combine_chunks()
    flat = features.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, num_bins)
    offsets = features.offsets.to_numpy() - features.offsets[0].as_py()
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
