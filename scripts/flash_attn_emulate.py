#!/usr/bin/env python3
"""Emulates kernels/flash_attn.cu step by step in numpy and checks it against plain softmax
attention, so the kernel's indexing, tiling and online softmax can be checked without a GPU.

What is mirrored exactly: the global offsets (heads interleaved, rows H*64 apart), the 16-byte
chunked tile loads with zero fill, the shared-memory layout (leading dims 72 and 72, Q and P
sharing one buffer, one f32 scratch per warp used for S and then for O), every wmma fragment
pointer and leading dimension (row/column-major as the kernel declares them), the per-lane
masking, the online max/sum with exp2 and the folded scale, the rounding of P to the storage
dtype, the rescale of O through the scratch, and the final O / l with the row bound.
What is not: the order of the tensor cores' f32 accumulation, exp2f's last-ulp error.

Shared memory starts as NaN and the output as NaN, so a read of an unwritten tile element or an
output element left unwritten shows up as NaN; every global read and write is bounds-checked
(numpy slicing would silently truncate) and every output element must be written exactly once.

    /work/pyenv/bin/python scripts/flash_attn_emulate.py
"""

import numpy as np

D = 64
BQ = 64
BK = 64
WARPS = 4
THREADS = 32 * WARPS
LDH = 72
LDF = 72


def round_bf16(x):
    """float32 -> nearest bf16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def round_f16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


ROUND = {"bf16": round_bf16, "f16": round_f16}


class Shared:
    """One flat shared-memory buffer per region; byte offsets checked for wmma's alignment."""

    def __init__(self, elems, elem_bytes, base_bytes):
        self.a = np.full(elems, np.nan, dtype=np.float32)
        self.elem_bytes = elem_bytes
        self.base = base_bytes

    def frag_load(self, off, ldm, layout):
        assert (self.base + off * self.elem_bytes) % 32 == 0, "fragment pointer not 256-bit aligned"
        assert ldm % (8 if self.elem_bytes == 2 else 4) == 0
        idx = np.arange(16)
        if layout == "row":
            flat = off + idx[:, None] * ldm + idx[None, :]
        else:
            flat = off + idx[None, :] * ldm + idx[:, None]
        assert flat.max() < self.a.size
        return self.a[flat].copy()

    def frag_store(self, off, ldm, m):
        assert (self.base + off * self.elem_bytes) % 32 == 0
        idx = np.arange(16)
        flat = off + idx[:, None] * ldm + idx[None, :]
        assert flat.max() < self.a.size
        self.a[flat] = m


def load_tile(dst, src, src_off, ld, valid):
    """kernels' load_tile: 4 passes of 128 threads, 16-byte chunks, zero rows >= valid."""
    for i in range(BQ * (D // 8) // THREADS):
        for t in range(THREADS):
            c = t + i * THREADS
            r, col = c // (D // 8), (c % (D // 8)) * 8
            if r < valid:
                g = src_off + r * ld + col
                assert g % 8 == 0, "16-byte global load misaligned"
                assert 0 <= g and g + 8 <= src.size, "global read out of bounds"
                chunk = src[g : g + 8]
            else:
                chunk = np.zeros(8, dtype=np.float32)
            dst.a[r * LDH + col : r * LDH + col + 8] = chunk


def flash_attn(q, k, v, o, written, B, H, lq, lk, scale_log2, rnd):
    ld = H * D
    tile_bytes = BQ * LDH * 2
    for bz in range(B):
        for by in range(H):
            for bx in range((lq + BQ - 1) // BQ):
                qp_s = Shared(BQ * LDH, 2, 0)
                k_s = Shared(BK * LDH, 2, tile_bytes)
                v_s = Shared(BK * LDH, 2, 2 * tile_bytes)
                f_s = Shared(WARPS * 16 * LDF, 4, 3 * tile_bytes)
                q0 = bx * BQ
                col0 = by * D
                qb = (bz * lq + q0) * ld + col0
                kb = bz * lk * ld + col0
                vb = bz * lk * ld + col0
                ob = (bz * lq + q0) * ld + col0

                load_tile(qp_s, q, qb, ld, min(BQ, lq - q0))
                warps = []
                for w in range(WARPS):
                    p_w = w * 16 * LDH
                    f_w = w * 16 * LDF
                    qf = [qp_s.frag_load(p_w + kk * 16, LDH, "row") for kk in range(D // 16)]
                    of = [np.zeros((16, 16), np.float32) for _ in range(D // 16)]
                    warps.append(
                        dict(p_w=p_w, f_w=f_w, qf=qf, of=of,
                             m=np.full(32, -np.inf, np.float32),
                             l=np.zeros(32, np.float32),
                             alpha=np.ones(32, np.float32))
                    )
                for k0 in range(0, lk, BK):
                    valid = min(BK, lk - k0)
                    load_tile(k_s, k, kb + k0 * ld, ld, valid)
                    load_tile(v_s, v, vb + k0 * ld, ld, valid)
                    for w in range(WARPS):
                        st = warps[w]
                        p_w, f_w = st["p_w"], st["f_w"]
                        for n in range(BK // 16):
                            sf = np.zeros((16, 16), np.float32)
                            for kk in range(D // 16):
                                kf = k_s.frag_load(n * 16 * LDH + kk * 16, LDH, "col")
                                sf = sf + st["qf"][kk] @ kf
                            f_s.frag_store(f_w + n * 16, LDF, sf)
                        lane = np.arange(32)
                        valid0 = lane < valid
                        valid1 = lane + 32 < valid
                        for r in range(16):
                            s0 = f_s.a[f_w + r * LDF + lane]
                            s1 = f_s.a[f_w + r * LDF + lane + 32]
                            x0 = np.where(valid0, s0 * np.float32(scale_log2), -np.inf).astype(np.float32)
                            x1 = np.where(valid1, s1 * np.float32(scale_log2), -np.inf).astype(np.float32)
                            m_old = st["m"][r]
                            m_new = np.float32(max(m_old, np.max(np.maximum(x0, x1))))
                            with np.errstate(invalid="raise"):
                                alpha = np.float32(np.exp2(np.float32(m_old - m_new)))
                                p0 = rnd(np.exp2((x0 - m_new).astype(np.float32)))
                                p1 = rnd(np.exp2((x1 - m_new).astype(np.float32)))
                            qp_s.a[p_w + r * LDH + lane] = p0
                            qp_s.a[p_w + r * LDH + lane + 32] = p1
                            total = np.float32(np.sum(p0 + p1, dtype=np.float32))
                            l_old = st["l"][r]
                            st["m"][r] = m_new
                            st["l"][r] = l_old * alpha + total
                            st["alpha"][r] = alpha
                        for n in range(D // 16):
                            f_s.frag_store(f_w + n * 16, LDF, st["of"][n])
                        for r in range(16):
                            a = st["alpha"][r]
                            f_s.a[f_w + r * LDF + lane] *= a
                            f_s.a[f_w + r * LDF + lane + 32] *= a
                        pf = [qp_s.frag_load(p_w + kk * 16, LDH, "row") for kk in range(BK // 16)]
                        for n in range(D // 16):
                            acc = f_s.frag_load(f_w + n * 16, LDF, "row")
                            for kk in range(BK // 16):
                                vf = v_s.frag_load(kk * 16 * LDH + n * 16, LDH, "row")
                                acc = acc + pf[kk] @ vf
                            st["of"][n] = acc
                for w in range(WARPS):
                    st = warps[w]
                    f_w = st["f_w"]
                    for n in range(D // 16):
                        f_s.frag_store(f_w + n * 16, LDF, st["of"][n])
                    for r in range(16):
                        row = w * 16 + r
                        inv = np.float32(1.0) / st["l"][r]
                        assert st["l"][r] >= 1.0
                        if q0 + row < lq:
                            for c in (lane, lane + 32):
                                g = ob + row * ld + c
                                assert g.min() >= 0 and g.max() < o.size, "write out of bounds"
                                o[g] = rnd(f_s.a[f_w + r * LDF + c] * inv)
                                written[g] += 1


def reference(q, k, v, B, H, lq, lk, scale):
    """Plain softmax attention in float64 on the (already rounded) inputs."""
    qh = q.reshape(B, lq, H, D).transpose(0, 2, 1, 3).astype(np.float64)
    kh = k.reshape(B, lk, H, D).transpose(0, 2, 1, 3).astype(np.float64)
    vh = v.reshape(B, lk, H, D).transpose(0, 2, 1, 3).astype(np.float64)
    s = scale * qh @ kh.transpose(0, 1, 3, 2)
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(-1)


def check(rng, dtype, B, H, lq, lk, gain):
    rnd = ROUND[dtype]

    def rand(n):
        m = rng.uniform(0.05, 2.0, n) * rng.choice([-1.0, 1.0], n)
        return rnd(m.astype(np.float32))

    q = rnd(rand(B * lq * H * D) * np.float32(gain))
    k = rand(B * lk * H * D)
    v = rand(B * lk * H * D)
    scale = 1.0 / 8.0
    o = np.full(B * lq * H * D, np.nan, dtype=np.float32)
    written = np.zeros(o.size, dtype=np.int64)
    flash_attn(q, k, v, o, written, B, H, lq, lk, np.float32(scale * np.log2(np.e)), rnd)
    assert (written == 1).all(), "every output element written exactly once"
    assert np.isfinite(o).all()
    want = reference(q, k, v, B, H, lq, lk, scale)
    rel = np.abs(o - want).max() / np.abs(want).max()
    bound = {"bf16": 1e-2, "f16": 2e-3}[dtype]
    print(f"{dtype} B={B} H={H} lq={lq} lk={lk} gain={gain}: rel err {rel:.2e} (bound {bound:.0e})")
    assert rel <= bound, rel


def main():
    rng = np.random.default_rng(0)
    cases = [
        (1, 1, 1, 1, 1.0),
        (3, 5, 15, 77, 1.0),
        (1, 10, 100, 100, 1.0),
        (1, 1, 256, 256, 10.0),
        (2, 1, 77, 1030, 10.0),
        (1, 5, 130, 15, 1.0),
        (1, 2, 64, 128, 1.0),
    ]
    for dtype in ("bf16", "f16"):
        for case in cases:
            check(rng, dtype, *case)
    print("ok")


if __name__ == "__main__":
    main()
