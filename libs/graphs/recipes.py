"""The three KA-MIG knowledge graphs built from token maps: pure, vectorised, no I/O.
Recipes and parameters: docs/reference.md#knowledge-graphs.

Token maps are integer arrays [N,h,w] of codebook ids in [0,K) (uint16 or any int dtype, memmaps
welcome: they are read chunk by chunk). Edge graphs are returned as numpy arrays
(edge_index int64 [2,E], edge_weight [E]) in the layout of the released files:
the graph's own edges in row-major order (source ascending, then target ascending), followed by
one self-loop per node 0..K-1; weights are scaled by 1/sqrt(c_i*c_j) with c = edges leaving a node.

Position-token incompatibility G_p is kept as bits: `occurrence_bits` marks which (class, position,
token) occur in the training maps; the 1/|I| rows are derived on the fly (`incompatibility_rows`).
Null-class convention: the packed array has rows for classes 0..C-1 only; the model gives the null
class (id C) an all-zero prior by its class id. A row that is all zero in the paper's dense G_p
("every token occurs") is stored as all-ones bits, so a dense [C+1,L,K] tensor whose last class is
zero also round-trips to an all-zero prior for that class.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# (dy, dx) offsets of one half of each neighbourhood; the other half is the mirror image, whose
# counts are the transpose, so counting one half and adding the transpose gives ordered pairs.
HALF_OFFSETS = {
    8: ((0, 1), (1, -1), (1, 0), (1, 1)),
    4: ((0, 1), (1, 0)),
}


# ----------------------------------------------------------------------------- validation

def check_maps(maps, codebook_size: int, name: str = "token maps"):
    """Raises ValueError unless `maps` is an integer array [N,h,w]; returns (N, h, w)."""
    if not hasattr(maps, "shape") or len(maps.shape) != 3:
        raise ValueError(f"{name} must have shape [N,h,w], got {getattr(maps, 'shape', type(maps))}")
    if not np.issubdtype(np.dtype(maps.dtype), np.integer):
        raise ValueError(f"{name} must hold integer codebook ids, got dtype {maps.dtype}")
    if int(codebook_size) < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    return tuple(int(s) for s in maps.shape)


def check_ids(chunk: np.ndarray, codebook_size: int, name: str = "token maps"):
    """Raises ValueError if any id of `chunk` is outside [0, codebook_size)."""
    if chunk.size and (int(chunk.min()) < 0 or int(chunk.max()) >= codebook_size):
        raise ValueError(f"{name} hold ids in [{int(chunk.min())}, {int(chunk.max())}], "
                         f"outside the codebook [0, {codebook_size})")


# the recipe values each graph uses (config.graph.recipe keys); G_p uses all maps and no parameter
RECIPE_KEYS = {"co": ("max_images", "seed", "neighbourhood", "co_ratio"),
               "sim": ("max_images", "seed", "sim_k", "sim_alpha", "sim_measure", "sim_frobenius_norm"),
               "incompat": ()}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(v)


def recipe_problems(recipe: dict, graphs=tuple(RECIPE_KEYS), codebook_size: int = None) -> list:
    """[(key, value, what is allowed)] for each value of `recipe` that a graph in `graphs` uses and cannot use
    (types, finite numbers, ranges; sim_k against the codebook when `codebook_size` is given); [] if all fit."""
    rules = {
        "max_images": (lambda v: v is None or _is_int(v), "an integer (<= 0: all maps)"),
        "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "neighbourhood": (lambda v: _is_int(v) and v in HALF_OFFSETS, "4 or 8"),
        "co_ratio": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1]"),
        "sim_k": (lambda v: _is_int(v) and v >= 1 and (codebook_size is None or v <= codebook_size - 1),
                  "an integer in [1, K-1]" + (f" = [1, {codebook_size - 1}]" if codebook_size else "")),
        "sim_alpha": (lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
        "sim_measure": (lambda v: v in SIM_MEASURES, " or ".join(SIM_MEASURES)),
        "sim_frobenius_norm": (lambda v: isinstance(v, (bool, np.bool_)), "true or false"),
    }
    keys = dict.fromkeys(k for g in graphs for k in RECIPE_KEYS[g])  # in order, once
    return [(k, recipe.get(k), rules[k][1]) for k in keys if not rules[k][0](recipe.get(k))]


def chunk_slices(n: int, chunk: int):
    """Consecutive slices of at most `chunk` items covering range(n)."""
    return [slice(s, min(s + chunk, n)) for s in range(0, n, max(1, chunk))]


def run_chunks(fn, slices, num_threads=None, progress=None):
    """Yields fn(s) for each slice in order, on up to `num_threads` threads (numpy frees the GIL).

    `progress` optionally wraps the result iterator (e.g. functools.partial(tqdm, desc=...)).
    """
    num_threads = num_threads or min(os.cpu_count() or 1, 4)
    wrap = progress or (lambda it, **kw: it)
    if num_threads <= 1 or len(slices) <= 1:
        yield from wrap((fn(s) for s in slices), total=len(slices))
        return
    pool = ThreadPoolExecutor(num_threads)
    try:
        yield from wrap(pool.map(fn, slices), total=len(slices))
    finally:  # on an error (e.g. a bad id in one chunk) the chunks not yet started are dropped
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- sampling

def sample_image_indices(n: int, max_images, seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of a seeded random subset of `max_images` of range(n) (all if None or >= n)."""
    if max_images is None or max_images <= 0 or max_images >= n:
        return np.arange(n, dtype=np.int64)
    idx = np.random.default_rng(seed).choice(n, size=int(max_images), replace=False)
    return np.sort(idx).astype(np.int64)


# ----------------------------------------------------------------------------- G_co

def co_occurrence_counts(maps, codebook_size: int, neighbourhood: int = 8, chunk: int = 4096,
                         num_threads=None, progress=None) -> np.ndarray:
    """[K,K] int64 counts of ordered (centre, neighbour) pairs over the 4/8-neighbourhood (no wrap)."""
    if neighbourhood not in HALF_OFFSETS:
        raise ValueError(f"neighbourhood must be 4 or 8, got {neighbourhood}")
    n, h, w = check_maps(maps, codebook_size)
    K = int(codebook_size)
    index_dtype = np.int32 if K * K < 2 ** 31 else np.int64  # int32 halves the memory traffic
    offsets = HALF_OFFSETS[neighbourhood]
    sizes = [max(0, h - abs(dy)) * max(0, w - abs(dx)) for dy, dx in offsets]  # pairs per map

    def count(s):
        m = np.asarray(maps[s])  # [n,h,w], read from a memmap chunk by chunk
        check_ids(m, K)
        m = np.ascontiguousarray(m.transpose(1, 2, 0), dtype=index_dtype)  # [h,w,n] position-major
        centre_k = m * K  # [h,w,n]
        pairs = np.empty((sum(sizes), m.shape[2]), dtype=index_dtype)  # [pairs per map, n]
        start = 0
        for (dy, dx), size in zip(offsets, sizes):
            # centres at (y, x), neighbours at (y+dy, x+dx), both inside the grid
            centre = centre_k[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]  # [h',w',n]
            neigh = m[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]  # [h',w',n]
            np.add(centre, neigh, out=pairs[start:start + size].reshape(centre.shape))
            start += size
        return np.bincount(pairs.ravel(), minlength=K * K)  # [K*K] centre*K + neighbour

    half = np.zeros(K * K, dtype=np.int64)
    for c in run_chunks(count, chunk_slices(n, chunk), num_threads, progress):
        half += c
    half = half.reshape(K, K)
    return half + half.T  # the mirrored offsets count (neighbour, centre)


def add_self_loops_and_scale(src, dst, weight, num_nodes: int, dtype=np.float32):
    """Appends self-loops (weight 1) for all nodes, then scales w_ij by 1/sqrt(c_i*c_j), c = out-edge counts."""
    src = np.concatenate([np.asarray(src, np.int64), np.arange(num_nodes, dtype=np.int64)])  # [E]
    dst = np.concatenate([np.asarray(dst, np.int64), np.arange(num_nodes, dtype=np.int64)])  # [E]
    weight = np.concatenate([np.asarray(weight, np.float64), np.ones(num_nodes)])  # [E]
    c = np.bincount(src, minlength=num_nodes).astype(np.float64)  # edges leaving each node, >= 1
    weight = weight / np.sqrt(c[src] * c[dst])
    return np.stack([src, dst]), weight.astype(dtype)


def top_counts_mask(counts, k_row, chunk_elements: int = 1 << 22) -> np.ndarray:
    """bool [K,K]: in row i, the k_row[i] largest non-zero counts, chosen exactly as torch.topk on CPU.

    The selection is `torch.topk(v, k)` with `v` the row's non-zero counts as a float32 vector in
    increasing id order (zeros left out), which is how the released G_co was selected: ties at the
    cut-off are kept wherever torch's CPU topk keeps them (neither the smaller nor the larger id in
    general), so the same counts give the same edges. Rows are vectorised by grouping those with the
    same number of non-zero counts (torch's CPU topk treats every row of a batch exactly like the same
    values as a 1-D vector) and chunked to about `chunk_elements` values per call. Counts above 2**24
    are rounded to float32 for the selection, as in that recipe.
    """
    counts = np.asarray(counts)
    K = counts.shape[0]
    nonzero = counts > 0  # [K,K]
    nnz = nonzero.sum(1)  # [K]
    keep = np.zeros((K, K), dtype=bool)
    for n in np.unique(nnz[(nnz > 0) & (np.asarray(k_row) > 0)]):
        rows = np.nonzero(nnz == n)[0]  # rows with n candidates
        k = int(k_row[rows[0]])  # k depends on n only
        for s in chunk_slices(len(rows), max(1, chunk_elements // max(K, 1))):
            r = rows[s]
            cols = np.nonzero(nonzero[r])[1].reshape(len(r), n)  # [r,n] candidate ids, ascending per row
            values = np.take_along_axis(counts[r], cols, axis=1).astype(np.float32)  # [r,n]
            picked = torch.topk(torch.from_numpy(values), k, dim=1).indices.numpy()  # [r,k] positions
            keep[r[:, None], np.take_along_axis(cols, picked, axis=1)] = True
    return keep


def co_occurrence_graph(counts, ratio: float, dtype=np.float32):
    """G_co from [K,K] counts: per row the top max(1, int(nnz*ratio)) off-diagonal counts, self-loops, scaling.

    The selection is torch.topk's on CPU over the row's non-zero counts (float32, id order), ties
    included (`top_counts_mask`). Rows without co-occurrences keep only the self-loop. Weights are the
    counts (1 for self-loops) divided by sqrt(c_i*c_j).
    """
    counts = np.array(counts, dtype=np.int64)  # copy [K,K]
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"counts must be a square [K,K] matrix, got shape {counts.shape}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if counts.size and counts.min() < 0:
        raise ValueError("counts must be non-negative")
    K = counts.shape[0]
    np.fill_diagonal(counts, 0)
    nnz = (counts > 0).sum(1)  # [K]
    k_row = np.where(nnz > 0, np.maximum(1, np.floor(nnz * float(ratio)).astype(np.int64)), 0)  # [K]
    src, dst = np.nonzero(top_counts_mask(counts, k_row))  # row-major order
    return add_self_loops_and_scale(src, dst, counts[src, dst], K, dtype)


# ----------------------------------------------------------------------------- G_s

def position_histograms(maps, codebook_size: int, chunk: int = 16384, num_threads=None,
                        progress=None) -> np.ndarray:
    """[K, h*w] int64: how often each token occurs at each (row-major) position."""
    n, h, w = check_maps(maps, codebook_size)
    K, L = int(codebook_size), h * w
    pos = np.arange(L, dtype=np.int64)

    def count(s):
        m = np.asarray(maps[s]).reshape(-1, L)  # [n,L]
        check_ids(m, K)
        return np.bincount((m.astype(np.int64) * L + pos).ravel(), minlength=K * L)  # [K*L]

    hist = np.zeros(K * L, dtype=np.int64)
    for c in run_chunks(count, chunk_slices(n, chunk), num_threads, progress):
        hist += c
    return hist.reshape(K, L)


def position_distributions(hist, frobenius_norm: bool = False) -> np.ndarray:
    """float64 [K,L]: rows min-max normalised (constant rows -> 0), row softmax.

    frobenius_norm=True divides the min-max normalised matrix by its Frobenius norm before the
    softmax (a variant; the released G_s was built without this step).
    """
    x = np.asarray(hist, dtype=np.float64)  # [K,L]
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    span = hi - lo
    x = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)
    if frobenius_norm:
        norm = np.linalg.norm(x)
        if norm > 0:
            x = x / norm
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Natural-log JS divergence between the rows of p [A,L] and q [B,L] (entries > 0) -> [A,B].

    Uses 0.5 * sum(p log a + q log(2 - a)) with a = 2p/(p+q) = p/m: the logs are of ratios near 1,
    so nearly equal distributions keep their tiny divergence (no difference of entropies).
    """
    p, q = p[:, None, :], q[None, :, :]  # [A,1,L], [1,B,L]
    a = p + q  # [A,B,L]
    np.divide(2.0 * p, a, out=a)  # p/m
    b = np.subtract(2.0, a)  # q/m
    np.log(a, out=a)
    np.log(b, out=b)
    a *= p
    b *= q
    a += b
    return np.maximum(0.5 * a.sum(-1), 0.0)  # [A,B]


def jensen_shannon_matrix(p: np.ndarray, chunk: int = 8, num_threads=None, progress=None) -> np.ndarray:
    """[K,K] JS divergences between all rows of p [K,L]; each pair is computed once (upper triangle)."""
    K = p.shape[0]
    js = np.empty((K, K))

    def fill(s):
        block = jensen_shannon(p[s], p[s.start:])  # [B, K - start]: rows s against s.start..K-1
        js[s, s.start:] = block
        js[s.start:, s] = block.T  # symmetric; chunks write disjoint cells, so threads never collide

    for _ in run_chunks(fill, chunk_slices(K, chunk), num_threads, progress):
        pass
    return js


SIM_MEASURES = ("divergence", "distance")


def similarity_graph(hist, k: int, alpha: float, measure: str = "divergence", *, frobenius_norm: bool = False,
                     chunk: int = 8, dtype=np.float64, num_threads=None, progress=None):
    """G_s from position histograms [K,L]: each token -> its k nearest other tokens, weight exp(-alpha*d).

    The defaults are the recipe of the released file: rows min-max normalised, no division by the
    Frobenius norm, row softmax, and d = the Jensen-Shannon divergence (natural log) between the
    tokens' position distributions. Variants: measure="distance" uses sqrt(divergence) (scipy's
    `jensenshannon`; same neighbours, other weights); frobenius_norm=True adds the norm step, which
    pushes every distribution towards uniform (tiny divergences) and changes neighbours and weights.
    Ties are broken by the smaller id; a token never equals its own neighbour. Tokens that never
    occur get a uniform distribution (no NaN). Then self-loops and the edge-count scaling.
    """
    if measure not in SIM_MEASURES:
        raise ValueError(f"measure must be 'divergence' or 'distance', got {measure!r}")
    hist = np.asarray(hist)
    if hist.ndim != 2:
        raise ValueError(f"position histograms must be [K,L], got shape {hist.shape}")
    K = hist.shape[0]
    if not 1 <= k < K:
        raise ValueError(f"k must be in [1, K-1] = [1, {K - 1}], got {k}")
    p = position_distributions(hist, frobenius_norm=frobenius_norm)  # [K,L]
    d = jensen_shannon_matrix(p, chunk, num_threads, progress)  # [K,K]
    if measure == "distance":
        np.sqrt(d, out=d)
    np.fill_diagonal(d, np.inf)  # never its own neighbour
    nearest = np.argsort(d, axis=1, kind="stable")[:, :k]  # [K,k] smallest, ties -> smaller id
    nearest.sort(axis=1)  # row-major edge order: targets ascending
    weight = np.exp(-alpha * np.take_along_axis(d, nearest, axis=1))  # [K,k]
    src = np.repeat(np.arange(K), k)
    return add_self_loops_and_scale(src, nearest.ravel(), weight.ravel(), K, dtype)


# ----------------------------------------------------------------------------- G_p

def occurrence_bits(maps, labels, num_classes: int, codebook_size: int, chunk: int = 16384,
                    block_bytes: int = 4 << 20, num_threads=None, progress=None) -> np.ndarray:
    """uint8 [C, h*w, ceil(K/8)]: bit (c, i, t) set iff token t occurs at position i in a map of class c.

    Bits are np.packbits(..., bitorder='little') along the token axis: token t is bit t%8 of byte t//8.
    Maps are visited class block by class block (a few classes whose [c,L,K] bools fit in cache), so
    the scattered writes stay local.
    """
    n, h, w = check_maps(maps, codebook_size)
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [N] = [{n}], got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels lie in [{int(labels.min())}, {int(labels.max())}], outside the "
                         f"classes [0, {num_classes}) (the null class {num_classes} has no maps)")
    C, K, L = int(num_classes), int(codebook_size), h * w
    packed = np.zeros((C, L, math.ceil(K / 8)), dtype=np.uint8)
    order = np.argsort(labels, kind="stable")  # [N] rows grouped by class
    bounds = np.searchsorted(labels[order], np.arange(C + 1))  # class c owns order[bounds[c]:bounds[c+1]]
    per_block = max(1, block_bytes // (L * K))  # classes per block
    pos = np.arange(L, dtype=np.int64) * K

    def mark(s):  # s: a slice of classes
        occurs = np.zeros((s.stop - s.start) * L * K, dtype=bool)  # flat [c,L,K] of this block
        rows = order[bounds[s.start]:bounds[s.stop]]
        for r in chunk_slices(len(rows), chunk):
            idx = np.sort(rows[r])  # ascending rows read a memmap sequentially
            m = np.asarray(maps[idx]).reshape(-1, L)  # [n,L]
            check_ids(m, K)
            flat = (labels[idx].astype(np.int64) - s.start)[:, None] * (L * K) + pos + m  # [n,L]
            occurs[flat.ravel()] = True
        packed[s] = np.packbits(occurs.reshape(-1, L, K), axis=-1, bitorder="little")

    for _ in run_chunks(mark, chunk_slices(C, per_block), num_threads, progress):
        pass
    return packed


def dense_to_occurrence(dense) -> np.ndarray:
    """Packed occurrence bits from the paper's dense G_p [C,L,K] (token occurs <=> its entry is 0)."""
    if isinstance(dense, torch.Tensor):
        dense = dense.detach().cpu().numpy()
    if getattr(dense, "ndim", None) != 3:
        raise ValueError(f"dense incompatibility must be [C,L,K], got shape {getattr(dense, 'shape', None)}")
    C, L, K = dense.shape
    packed = np.zeros((C, L, math.ceil(K / 8)), dtype=np.uint8)
    for s in chunk_slices(C, 32):  # a few classes at a time: a memory-mapped 1 GB tensor stays on disk
        packed[s] = np.packbits(np.asarray(dense[s]) == 0, axis=-1, bitorder="little")  # [c,L,ceil(K/8)]
    return packed


def unpack_occurrence_torch(packed: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """bool [..., L, K] from packed uint8 [..., L, ceil(K/8)] (little bit order), on packed's device."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [..., L, ceil(K/8), 8]
    return bits.flatten(-2)[..., :codebook_size].bool()


def unpack_occurrence(packed, codebook_size: int):
    """bool [..., L, K] from packed bits; numpy in -> numpy out, torch in -> torch out."""
    if isinstance(packed, torch.Tensor):
        return unpack_occurrence_torch(packed, codebook_size)
    packed = np.asarray(packed, dtype=np.uint8)
    return np.unpackbits(packed, axis=-1, count=codebook_size, bitorder="little").astype(bool)


def incompatibility_rows(occurs, dtype=None):
    """G_p rows [..., L, K]: 1/|I| on the tokens I that never occur, 0 elsewhere (zeros if I is empty)."""
    if isinstance(occurs, torch.Tensor):
        never = ~occurs.bool()
        n = never.sum(-1, keepdim=True)  # [..., L, 1]
        dtype = dtype or torch.float32
        return never.to(dtype) / n.clamp_min(1).to(dtype)
    never = ~np.asarray(occurs, dtype=bool)
    n = never.sum(-1, keepdims=True)  # [..., L, 1]
    dtype = dtype or np.float32
    return never.astype(dtype) / np.maximum(n, 1).astype(dtype)
