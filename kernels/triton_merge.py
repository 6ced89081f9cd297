"""The fused merge kernel (Triton) and its host side: work tables, grouping, one launch per dtype class.

Per output tile of ``BLOCK_M × BLOCK_N``: load the ``w0`` tile → fp32 (× ``base_scale``); for each LoRA term,
``part = Σ dot(up[:, r:r+BLOCK_R], down[r:r+BLOCK_R, :])`` over the term's rank, padded to a multiple of
``BLOCK_R`` (≥ 16) by masked loads of zeros, then ``acc += scale·part`` in fp32 (so 16-bit factors are used
as stored: their products are exact); for each dense term ``acc += a·(W − w0)``; store once, rounded to
nearest-even. Tiles are disjoint: no split-K, no atomics, so a run is bitwise deterministic.

Grouping: tensors live anywhere in memory, so each role (dst, w0, factors, dense) gets a base pointer — the
lowest-addressed tensor of that role — and every tensor is an element offset from it. One launch covers every
item whose roles share dtypes (in practice: one launch per merge); its grid is the concatenation of all their
tiles, and a program finds its item in an int32 tile table.

Interpreter (``TRITON_INTERPRET=1`` when this module is imported) — checked on Triton 3.8:
- a bf16 ``tl.dot`` multiplies the raw uint16 bit patterns (errors ~1e10): bf16 factors are upcast to fp32
  first (exact, the products are exact either way);
- ``.to(tl.bfloat16)`` truncates, with or without ``fp_downcast_rounding="rtne"``, and mis-converts fp32
  subnormals: the bf16 store is rounded by hand on the bit pattern;
- ``tl.dot`` accepts K < 16 (the GPU does not): ``BLOCK_R ≥ 16`` is asserted on the host;
- fp16 ``tl.dot`` and ``.to(tl.float16)`` (numpy, round-to-nearest-even) are correct and used as on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from weightlab.kernels.items import KernelError, MergeItem, label

ALIGN_ELEMS = 8  # aligned groups: 32-byte addresses; row strides, widths (and ranks) multiples of 8 elements

# Column layouts of the int64 work tables (the kernel reads them by these positions).
ITEM_COLS = ("rows", "cols", "first_tile", "dst_off", "dst_sm", "dst_sn", "w0_off", "w0_sm", "w0_sn",
             "term_lo", "term_hi", "dense_lo", "dense_hi")
TERM_COLS = ("up_off", "down_off", "rank")  # factors are contiguous: up [rows, rank], down [rank, cols]
DENSE_COLS = ("off", "sm", "sn")


@triton.jit
def _merge_kernel(dst_ptr, w0_ptr, fac_ptr, den_ptr, tile_item, items, item_scale, terms, term_scale, dense,
                  dense_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                  ALIGNED: tl.constexpr, FAC_ALIGNED: tl.constexpr, UPCAST_DOT: tl.constexpr,
                  ROUND_BF16: tl.constexpr):
    pid = tl.program_id(0)
    item = tl.load(tile_item + pid).to(tl.int64)
    row = items + item * 13  # ITEM_COLS
    rows = tl.load(row + 0)
    cols = tl.load(row + 1)
    local = pid - tl.load(row + 2)
    dst_off = tl.load(row + 3)
    dst_sm = tl.load(row + 4)
    w0_off = tl.load(row + 6)
    w0_sm = tl.load(row + 7)
    if ALIGNED:  # unit inner stride and 8-element alignment: lets loads and stores vectorize
        cols = tl.multiple_of(cols, 8)
        dst_off = tl.multiple_of(dst_off, 8)
        dst_sm = tl.multiple_of(dst_sm, 8)
        w0_off = tl.multiple_of(w0_off, 8)
        w0_sm = tl.multiple_of(w0_sm, 8)
        dst_sn = 1
        w0_sn = 1
    else:
        dst_sn = tl.load(row + 5)
        w0_sn = tl.load(row + 8)
    tiles_n = tl.cdiv(cols, BLOCK_N)
    rm = (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (local % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = rm < rows
    in_n = rn < cols
    mask = in_m[:, None] & in_n[None, :]
    w0_tile = w0_ptr + w0_off + rm[:, None] * w0_sm + rn[None, :] * w0_sn
    acc = tl.load(w0_tile, mask=mask, other=0.0).to(tl.float32) * tl.load(item_scale + item)

    for t in range(tl.load(row + 9), tl.load(row + 10)):  # LoRA terms
        term = terms + t * 3  # TERM_COLS
        up_off = tl.load(term + 0)
        down_off = tl.load(term + 1)
        rank = tl.load(term + 2)
        if FAC_ALIGNED:  # ranks and widths multiples of 8: factor loads vectorize too
            up_off = tl.multiple_of(up_off, 8)
            down_off = tl.multiple_of(down_off, 8)
            rank = tl.multiple_of(rank, 8)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            in_r = rr < rank
            b = tl.load(fac_ptr + up_off + rm[:, None] * rank + rr[None, :], mask=in_m[:, None] & in_r[None, :],
                        other=0.0)
            a = tl.load(fac_ptr + down_off + rr[:, None] * cols + rn[None, :], mask=in_r[:, None] & in_n[None, :],
                        other=0.0)
            if UPCAST_DOT:
                b = b.to(tl.float32)
                a = a.to(tl.float32)
            part = tl.dot(b, a, part, input_precision="ieee")
        acc += tl.load(term_scale + t) * part

    dense_lo = tl.load(row + 11)
    dense_hi = tl.load(row + 12)
    if dense_hi > dense_lo:
        w0 = tl.load(w0_tile, mask=mask, other=0.0).to(tl.float32)
        for d in range(dense_lo, dense_hi):
            den = dense + d * 3  # DENSE_COLS
            if ALIGNED:
                w_tile = den_ptr + tl.multiple_of(tl.load(den + 0), 8) + rm[:, None] * tl.multiple_of(
                    tl.load(den + 1), 8) + rn[None, :]
            else:
                w_tile = den_ptr + tl.load(den + 0) + rm[:, None] * tl.load(den + 1) + rn[None, :] * tl.load(den + 2)
            w = tl.load(w_tile, mask=mask, other=0.0).to(tl.float32)
            acc += tl.load(dense_scale + d) * (w - w0)

    out_ptr = dst_ptr + dst_off + rm[:, None] * dst_sm + rn[None, :] * dst_sn
    if ROUND_BF16:  # the interpreter truncates fp32 → bf16: round to nearest-even on the bits
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(acc != acc, 0x7FC0, bits)
        tl.store(out_ptr, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr, acc.to(dst_ptr.dtype.element_ty), mask=mask)


INTERPRET = isinstance(_merge_kernel, InterpretedFunction)  # what Triton decided when it decorated the kernel


@dataclass(frozen=True)
class _Tiles:
    block_m: int
    block_n: int
    block_r: int
    num_warps: int


@dataclass
class _Prepared:
    """One item's tensors as 2-D matrices on the kernel's device, in the dtypes the kernel reads."""

    dst: torch.Tensor
    w0: torch.Tensor
    loras: list[tuple[torch.Tensor, torch.Tensor, float]]  # (down [r, cols], up [rows, r], scale)
    denses: list[tuple[torch.Tensor, float]]
    base_scale: float

    @property
    def key(self) -> tuple:
        """What a launch specialises on; None marks "no such terms" (fits any group)."""
        fac = self.loras[0][0].dtype if self.loras else None
        den = self.denses[0][0].dtype if self.denses else None
        full = [self.dst, self.w0] + [w for w, _ in self.denses]
        aligned = self.dst.shape[1] % ALIGN_ELEMS == 0 and all(
            t.data_ptr() % 32 == 0 and t.stride(1) == 1 and t.stride(0) % ALIGN_ELEMS == 0 for t in full)
        fac_aligned = aligned and all(d.data_ptr() % 32 == 0 and u.data_ptr() % 32 == 0
                                      and d.shape[0] % ALIGN_ELEMS == 0 for d, u, _ in self.loras)
        return self.dst.device, self.dst.dtype, self.w0.dtype, aligned, fac, den, fac_aligned if self.loras else None


class TritonPlan:
    """Checked items turned into device work tables; `run` launches the kernel once per dtype class.

    Keeps references to every tensor it reads or writes; run it while those tensors keep their storage.
    """

    def __init__(self, items: Sequence[MergeItem], dims: Sequence[tuple[int, int]], *, block_m: int = 64,
                 block_n: int = 128, block_r: int = 16, num_warps: int = 4):
        for name, v in (("block_m", block_m), ("block_n", block_n), ("block_r", block_r)):
            if v < 16 or v & (v - 1):
                raise KernelError(f"{name}={v}: tl.dot needs M, N, K ≥ 16 and power-of-two tiles on the GPU. "
                                  "Fix: use 16, 32, 64 or 128.")
        self.tiles = _Tiles(block_m, block_n, block_r, num_warps)
        groups: list[list] = []  # [joint key, members]; items without LoRA/dense terms join any fitting group
        for i, (rows, cols) in enumerate(dims):
            p = _prepare(items, i, rows, cols)
            key = p.key
            for g in groups:
                if (joint := _join(g[0], key)) is not None:
                    g[0] = joint
                    g[1].append(p)
                    break
            else:
                groups.append([key, [p]])
        self._prepared = [p for _, members in groups for p in members]  # keeps converted copies alive
        launches = (_build_launch(key, members, self.tiles) for key, members in groups)
        self._launches = [launch for launch in launches if launch is not None]

    @property
    def num_launches(self) -> int:
        return len(self._launches)

    def run(self) -> None:
        """Launch the kernel(s); asynchronous on CUDA like any kernel launch."""
        for device, args, consts, grid in self._launches:
            if device.type == "cuda":
                with torch.cuda.device(device):
                    _merge_kernel[grid](*args, **consts, num_warps=self.tiles.num_warps)
            else:
                _merge_kernel[grid](*args, **consts, num_warps=self.tiles.num_warps)


def _join(a: tuple, b: tuple) -> tuple | None:
    """The key of a group holding both keys' items, or None if they need separate launches."""
    if a[:4] != b[:4]:
        return None
    joint = list(a)
    for k in (4, 5, 6):  # factor dtype, dense dtype, factor alignment: None means "has no such terms"
        if a[k] is None:
            joint[k] = b[k]
        elif b[k] is not None and b[k] != a[k]:
            return None
    return tuple(joint)


def _prepare(items: Sequence[MergeItem], i: int, rows: int, cols: int) -> _Prepared:
    item, where = items[i], label(items, i)
    dev = item.dst.device
    if dev.type != ("cpu" if INTERPRET else "cuda"):
        raise KernelError(f"{where}: dst is on {dev}; the Triton kernel runs on CUDA tensors (on CPU tensors only, "
                          "under TRITON_INTERPRET=1). Fix: use backend='torch' or 'auto'.")
    tensors = [("w0", item.w0)] + [(f"LoRA {k} {p}", t) for k, (d, u, _) in enumerate(item.loras)
                                   for p, t in (("down", d), ("up", u))]
    tensors += [(f"dense {k} W", w) for k, (w, _) in enumerate(item.denses)]
    for what, t in tensors:
        if t.device != dev:
            raise KernelError(f"{where}: {what} is on {t.device} but dst is on {dev}; the kernel reads every "
                              f"source on the destination's device. Fix: move it with `.to('{dev}')`, or use "
                              "backend='torch' (it moves sources per weight).")
    try:
        dst = item.dst.view(rows, cols)
    except RuntimeError:
        raise KernelError(f"{where}: dst with shape {tuple(item.dst.shape)} and strides {tuple(item.dst.stride())} "
                          "cannot be viewed as (out, in·kh·kw) (e.g. channels_last conv weights). Fix: make the "
                          "model's weights contiguous, or use backend='torch'.") from None
    loras = [(d.reshape(-1, cols).contiguous(), u.reshape(rows, -1).contiguous(), float(s)) for d, u, s in item.loras]
    fac_dtypes = {t.dtype for d, u, _ in loras for t in (d, u)}
    if len(fac_dtypes) > 1:  # one dot dtype per launch: mixed factors go in as fp32 (small copies)
        loras = [(d.float(), u.float(), s) for d, u, s in loras]
    denses = [(w.reshape(rows, cols), float(a)) for w, a in item.denses]
    if len({w.dtype for w, _ in denses}) > 1:
        denses = [(w.float(), a) for w, a in denses]
    return _Prepared(dst, item.w0.reshape(rows, cols), loras, denses, float(item.base_scale))


def _offsets(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, dict[int, int]]:
    """The lowest-addressed tensor (the role's base pointer) and each address's element offset from it."""
    base = min(tensors, key=torch.Tensor.data_ptr)
    size = base.element_size()
    offs = {}
    for t in tensors:
        delta = t.data_ptr() - base.data_ptr()
        if delta % size:
            raise KernelError(f"a {t.dtype} tensor starts at byte address {t.data_ptr()}, not a multiple of its "
                              "element size. Fix: pass `.clone()`d tensors.")
        offs[t.data_ptr()] = delta // size
    return base, offs


def _build_launch(key: tuple, group: list[_Prepared], tiles: _Tiles):
    """(device, kernel args, constexprs, grid) for one group, or None when it has nothing to write."""
    device, dst_dtype, _, aligned, fac_dtype, _, fac_aligned = key
    dst_base, dst_offs = _offsets([p.dst for p in group])
    w0_base, w0_offs = _offsets([p.w0 for p in group])
    factors = [t for p in group for d, u, _ in p.loras for t in (d, u)]
    fac_base, fac_offs = _offsets(factors) if factors else (dst_base, {})
    dense_ws = [w for p in group for w, _ in p.denses]
    den_base, den_offs = _offsets(dense_ws) if dense_ws else (dst_base, {})

    item_rows, item_scales, term_rows, term_scales, dense_rows, dense_scales, tile_counts = [], [], [], [], [], [], []
    first_tile = 0
    for p in group:
        rows, cols = p.dst.shape
        n_tiles = triton.cdiv(rows, tiles.block_m) * triton.cdiv(cols, tiles.block_n)
        term_lo, dense_lo = len(term_rows), len(dense_rows)
        for d, u, s in p.loras:
            term_rows.append([fac_offs[u.data_ptr()], fac_offs[d.data_ptr()], d.shape[0]])
            term_scales.append(s)
        for w, a in p.denses:
            dense_rows.append([den_offs[w.data_ptr()], w.stride(0), w.stride(1)])
            dense_scales.append(a)
        item_rows.append([rows, cols, first_tile, dst_offs[p.dst.data_ptr()], *p.dst.stride(),
                          w0_offs[p.w0.data_ptr()], *p.w0.stride(), term_lo, len(term_rows), dense_lo,
                          len(dense_rows)])
        item_scales.append(p.base_scale)
        tile_counts.append(n_tiles)
        first_tile += n_tiles
    if first_tile == 0:
        return None
    tile_item = torch.from_numpy(np.repeat(np.arange(len(group), dtype=np.int32), tile_counts))
    args = (dst_base, w0_base, fac_base, den_base, tile_item.to(device),
            _table(item_rows, len(ITEM_COLS), device), _vector(item_scales, device),
            _table(term_rows, len(TERM_COLS), device), _vector(term_scales, device),
            _table(dense_rows, len(DENSE_COLS), device), _vector(dense_scales, device))
    consts = dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_R=tiles.block_r, ALIGNED=aligned,
                  FAC_ALIGNED=bool(fac_aligned),
                  UPCAST_DOT=INTERPRET and fac_dtype == torch.bfloat16,
                  ROUND_BF16=INTERPRET and dst_dtype == torch.bfloat16)
    return device, args, consts, (first_tile,)


def _table(rows: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
    """An int64 work table on the device (one unused zero row when empty: kernels take no empty tensors)."""
    return torch.tensor(rows or [[0] * width], dtype=torch.int64).to(device)


def _vector(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values or [0.0], dtype=torch.float32).to(device)
