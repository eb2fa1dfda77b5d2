"""Where StagFormer's sections live: layers per section and the pieces each pipeline stage builds.

Pure functions (no torch, no process groups) so placement is tested on its own. A pipeline layout is
*aligned* with the sections when every stage lies inside one section (PP = m * p: a section spans m
stages, each holding an equal slice of it) or every stage holds whole sections (p = m * PP). Anything
else would put a section boundary inside a stage's slice of a section, which breaks the concurrent
decode placement (one section per rank) and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


class LayoutError(ValueError):
    """A StagFormer section/pipeline layout that cannot be built; the message names the fix."""


@dataclass(frozen=True)
class StagePiece:
    """A contiguous run of one section's layers built on one pipeline stage."""

    section: int  # 0-based section index
    first_layer: int  # index of the first layer inside the section
    num_layers: int
    section_layers: int  # layers of the whole section
    stage_in_section: int  # which of the section's stages this is (0 when a stage holds it whole)

    @property
    def starts_section(self) -> bool:
        return self.first_layer == 0

    @property
    def ends_section(self) -> bool:
        return self.first_layer + self.num_layers == self.section_layers


def section_layer_counts(
    num_layers: int, sections: int, explicit: Optional[Sequence[int]] = None
) -> list[int]:
    """Layers per section: an even split, or the explicit (possibly uneven) one."""
    if sections < 1:
        raise LayoutError(f"stag_sections={sections}: use 1 (plain GPT) or more sections.")
    if explicit:
        counts = [int(c) for c in explicit]
        if len(counts) != sections:
            raise LayoutError(
                f"stag_section_layers={counts} has {len(counts)} entries but stag_sections="
                f"{sections}: give one layer count per section."
            )
        if any(c < 1 for c in counts):
            raise LayoutError(f"stag_section_layers={counts}: every section needs >= 1 layer.")
        if sum(counts) != num_layers:
            raise LayoutError(
                f"stag_section_layers={counts} sums to {sum(counts)} but num_layers={num_layers}: "
                f"make them add up."
            )
        return counts
    if num_layers % sections:
        raise LayoutError(
            f"num_layers={num_layers} is not divisible by stag_sections={sections}: choose a "
            f"multiple of {sections} layers or give an explicit stag_section_layers split."
        )
    return [num_layers // sections] * sections


def stage_pieces(section_layers: Sequence[int], pp_size: int, pp_rank: int) -> list[StagePiece]:
    """The section pieces pipeline stage `pp_rank` of `pp_size` builds, in execution order."""
    p = len(section_layers)
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise LayoutError(f"pipeline rank {pp_rank} is outside pipeline size {pp_size}.")
    if pp_size >= p:
        if pp_size % p:
            raise LayoutError(
                f"pipeline_model_parallel_size={pp_size} is not aligned with stag_sections={p}: "
                f"use a multiple of {p} (a section spans PP/p stages) or a divisor of {p}."
            )
        m = pp_size // p
        section = pp_rank // m
        n = section_layers[section]
        if n % m:
            raise LayoutError(
                f"section {section} has {n} layers, which {m} pipeline stages per section cannot "
                f"split evenly: make every section's layer count a multiple of {m}."
            )
        per = n // m
        j = pp_rank % m
        return [StagePiece(section, j * per, per, n, j)]
    if p % pp_size:
        raise LayoutError(
            f"pipeline_model_parallel_size={pp_size} is not aligned with stag_sections={p}: "
            f"use a divisor of {p} (a stage holds whole sections) or a multiple of {p}."
        )
    k = p // pp_size
    return [StagePiece(s, 0, section_layers[s], section_layers[s], 0)
            for s in range(pp_rank * k, (pp_rank + 1) * k)]


def stream_slots(pieces: Sequence[StagePiece], combine_outputs: bool, receiving: bool) -> int:
    """Width (in hidden sizes) of the tensor a stage receives (`receiving`) or sends.

    The pipeline carries one tensor (megatron's schedules send exactly one):
    [h (only mid-section)] + [e (token embeddings)] + [finished section outputs].
    Without output combination only the latest finished output is needed (the next section's
    cross-attention memory); with it every finished output travels to the last stage.
    """
    piece = pieces[0] if receiving else pieces[-1]
    mid_section = (not piece.starts_section) if receiving else (not piece.ends_section)
    finished = piece.section if receiving else piece.section + (0 if mid_section else 1)
    outs = finished if combine_outputs else min(finished, 1)
    return int(mid_section) + 1 + outs
