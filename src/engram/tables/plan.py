"""Where each Engram table lives: a placement plan, as data in the run config.

The model code never names a placement. A run's `TrainConfig.tables` is a `TablePlan`: a default
placement for every table, and optional per-layer entries that override it. `PlacedTables`
(`engram.tables.placed`) reads the plan and installs each table's storage in the model.

    device   the table is an nn.Embedding inside the model, moved with it (today's default), and
             trained by torch's SparseAdam (bit-identical to RowAdam, tested)
    host     the rows (and their optimiser state) in CPU memory, pinned when CUDA is present
    disk     one sparse file per table under `path`: the table may be far larger than RAM

`cache_rows` puts a hot-row cache (aged LFU, `CachedStore`) of that many records in front of a
host or disk table, and `prefetch` pins the next batch's rows in it while the current step runs.
`optimizer` picks the row-wise optimiser: `adam` (the paper's) or `adagrad` (one accumulator per
row, for huge tables). A device table with `adagrad` is held in a device `RowStore`.

From the command line: `engram train tables.placement=disk tables.cache_rows=65536`; in a TOML
recipe, per layer:

    [tables]
    placement = "host"
    [[tables.layers]]
    layer = 1
    placement = "disk"
    cache_rows = 65536
"""

from __future__ import annotations

from dataclasses import dataclass, fields

PLACEMENTS = ("device", "host", "disk")
ROW_OPTIMIZERS = ("adam", "adagrad")


@dataclass(frozen=True)
class TablePlacement:
    """Where one table lives and how its rows are trained."""

    placement: str = "device"  # device | host | disk
    cache_rows: int = 0  # host/disk: records in a hot-row cache in front (0: no cache)
    optimizer: str = "adam"  # adam | adagrad, row-wise; neither has weight decay (paper)
    path: str = ""  # disk: where live tables go ("" = <run>/tables; else a subfolder per run)
    prefetch: bool = True  # cached tables: pin batch n+1's rows while step n computes

    def validate(self, where: str = "tables") -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"{where}.placement={self.placement!r} must be one of {PLACEMENTS}")
        if self.optimizer not in ROW_OPTIMIZERS:
            raise ValueError(
                f"{where}.optimizer={self.optimizer!r} must be one of {ROW_OPTIMIZERS}"
            )
        if self.cache_rows < 0:
            raise ValueError(f"{where}.cache_rows={self.cache_rows} must be >= 0")
        if self.cache_rows and self.placement == "device":
            raise ValueError(
                f"{where}.cache_rows={self.cache_rows}: a device table needs no cache "
                "(use placement host or disk)"
            )

    @property
    def embedded(self) -> bool:
        """Whether the table stays an nn.Embedding in the model (no row store)."""
        return self.placement == "device" and self.optimizer == "adam"


@dataclass(frozen=True)
class LayerPlacement(TablePlacement):
    """A per-layer entry of a `TablePlan`: the table of Engram layer `layer`."""

    layer: int = -1


@dataclass(frozen=True)
class TablePlan(TablePlacement):
    """The default placement of every table, and per-layer entries that replace it."""

    layers: tuple[LayerPlacement, ...] = ()

    def validate(self, where: str = "tables") -> None:
        super().validate(where)
        seen: set[int] = set()
        for i, entry in enumerate(self.layers):
            entry.validate(f"{where}.layers[{i}]")
            if entry.layer < 0 or entry.layer in seen:
                raise ValueError(
                    f"{where}.layers[{i}].layer={entry.layer} must be a layer id >= 0, named once"
                )
            seen.add(entry.layer)

    def for_layer(self, layer: int) -> TablePlacement:
        """The placement of the table of Engram layer `layer`."""
        entry = next((e for e in self.layers if e.layer == layer), self)
        # Just the placement's own fields: a plan entry's `layer` (or the plan's `layers`) are
        # not part of where one table lives.
        return TablePlacement(**{f.name: getattr(entry, f.name) for f in fields(TablePlacement)})

    def check_layers(self, layer_ids: tuple[int, ...] | list[int]) -> None:
        """Every per-layer entry must name a table the model has."""
        unknown = sorted({e.layer for e in self.layers} - set(layer_ids))
        if unknown:
            raise ValueError(
                f"tables.layers names layer(s) {unknown}, but the model's Engram tables "
                f"are at layers {sorted(layer_ids)}"
            )

    @property
    def all_embedded(self) -> bool:
        return self.embedded and all(e.embedded for e in self.layers)
