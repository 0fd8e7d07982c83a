"""Regenerates tests/fixtures/maskgit/: the official MaskGIT JAX/Flax code run on small random weights.

    python -m tools.make_maskgit_fixtures --mirror <git dir of google-research/maskgit> --jax-python <python>

`--jax-python` is an interpreter with JAX, Flax and ml_collections (requirements-fixtures.txt, e.g. a venv in
/tmp/jaxenv; the repo's .venv never needs them). The official sources are unpacked from the mirror's HEAD into a
temp folder (`git archive HEAD maskgit`), and this file re-runs itself there under `--jax-python` in worker mode,
which imports only the official modules, JAX and numpy. The worker builds a tiny class-conditional MaskGIT
(2 layers, width 64, 4 heads, 64 codes, 10 classes, 4x4 tokens) and a tiny VQGAN (32 filters, multipliers (2, 1),
two res blocks, 8x8 images), replaces every parameter by seeded random values on a 1/64 grid (so that the
committed files compress well), and records with the official code:

- `tokenizer_tiny.msgpack`, `transformer_tiny.msgpack`: the variables, serialised as flax.serialization does
  (the format of the released checkpoints);
- in `official.npz`: token ids of fixed images (`encode_to_indices`) and the pixels decoded from them
  (`decode_from_indices`); transformer logits [B,L+1,V] for fixed token rows (class token first, [MASK] written
  both as -1 and as V-1); full decodes through `inference.ImageNet_class_conditional_generator.generate_samples`
  (its restriction of the logits, its decode call, its tokenizer decode) with the ids of every step from
  `parallel_decode.decode`:
    * `det_T*`: the deterministic limit: choice temperature 0 and `jax.random.categorical` replaced by its
      zero-temperature limit (argmax of the logits; the release has no sampling-temperature argument);
    * `noise_T12`: the real stochastic sampler (choice temperature 4.5) from PRNGKey(0), with the two Gumbel
      draws of every step recomputed outside the loop from the same key splits (sample noise [B,L+1,K] for the
      categorical draw, choice noise [B,L+1] for the re-masking), so a test can replay them;
    * `edit_T12`: editing (start_iter 2 of 12, tokens of a fixed image kept outside a box), stochastic, with
      its noise.
Only the msgpack files and the npz are written (through libs.atomic_io, byte-reproducible).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

OUT = Path("tests/fixtures/maskgit")
GRID = 64.0  # parameters are multiples of 1/GRID
SIZES = dict(codebook_size=64, num_classes=10, embed_dim=64, depth=2, num_heads=4, intermediate_size=256,
             image_size=8, patch_size=2, filters=32, channel_multipliers=(2, 1), num_res_blocks=2, embedding_dim=16)
CHOICE_TEMPERATURE = 4.5


# ----------------------------------------------------------------------------- worker (JAX interpreter)


def stub_modules():
    """Empty stand-ins for the plotting / network / TF imports of the official inference module (unused here)."""
    for name in ("matplotlib", "matplotlib.pyplot", "matplotlib.patches", "requests", "tensorflow",
                 "tensorflow.compat", "tensorflow.compat.v1", "PIL"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["PIL"].Image = sys.modules["PIL"].ImageFilter = None
    sys.modules["tensorflow.compat"].v1 = sys.modules["tensorflow.compat.v1"]


def tiny_config(base):
    """The official class-conditional config with the tiny sizes."""
    cf = base()
    cf.num_class = SIZES["num_classes"]
    cf.image_size = SIZES["image_size"]
    cf.sample_choice_temperature = CHOICE_TEMPERATURE
    t = cf.transformer
    t.num_layers, t.num_embeds, t.num_heads = SIZES["depth"], SIZES["embed_dim"], SIZES["num_heads"]
    t.intermediate_size, t.patch_size = SIZES["intermediate_size"], SIZES["patch_size"]
    t.latent_size = SIZES["image_size"] // SIZES["patch_size"]
    v = cf.vqvae
    v.codebook_size, v.filters, v.embedding_dim = SIZES["codebook_size"], SIZES["filters"], SIZES["embedding_dim"]
    v.channel_multipliers, v.num_res_blocks = list(SIZES["channel_multipliers"]), SIZES["num_res_blocks"]
    return cf


def leaf_std(path, shape):
    """Spread of a random leaf: 1/sqrt(fan in) for kernels, 1 for embeddings and the codebook, 0.1 for biases."""
    name = path[-1]
    if name == "kernel":
        fan_in = shape[0] if any(p in ("query", "key", "value") for p in path) else int(np.prod(shape[:-1]))
        return 1.0 / np.sqrt(fan_in)
    return 1.0 if name in ("embedding", "codebook") else 0.1


def randomize(tree, rng, path=()):
    """Every leaf replaced by seeded values on the 1/GRID grid (norm scales around 1)."""
    if isinstance(tree, dict):
        return {k: randomize(tree[k], rng, path + (k,)) for k in sorted(tree)}
    shape = np.shape(tree)
    values = rng.standard_normal(shape) * leaf_std(path, shape)
    if path[-1] == "scale":
        values = 1.0 + 0.2 * rng.standard_normal(shape)
    return (np.round(values * GRID) / GRID).astype(np.float32)


def official_noise(jax, rng, steps, logits_shape):
    """The Gumbel draws of `steps` loop iterations of parallel_decode.decode from `rng`, recomputed with the same
    key splits: (sample noise [T,*logits_shape] of jax.random.categorical, choice noise [T,*logits_shape[:-1]])."""
    sample, choice = [], []
    for _ in range(steps):
        rng, sample_rng = jax.random.split(rng, 2)
        sample.append(np.asarray(jax.random.gumbel(sample_rng, logits_shape, np.float32)))
        rng, choice_rng = jax.random.split(rng)
        choice.append(np.asarray(jax.random.gumbel(choice_rng, logits_shape[:-1], np.float32)))
    return np.stack(sample), np.stack(choice)


def worker(src: Path, out: Path):
    """Runs the official code (unpacked in `src`) and writes the two msgpack files and arrays.npz into `out`."""
    sys.path.insert(0, str(src))
    stub_modules()
    import jax
    import jax.numpy as jnp
    from flax import serialization
    jnp.DeviceArray = jax.Array  # the release annotates with this old name (removed from JAX since)
    from maskgit import inference
    from maskgit.configs import maskgit_class_cond_config
    from maskgit.libml import parallel_decode

    base = maskgit_class_cond_config.get_config
    inference.maskgit_class_cond_config.get_config = lambda: tiny_config(base)
    inference.ImageNet_class_conditional_generator._load_checkpoints = lambda self: None
    gen = inference.ImageNet_class_conditional_generator(image_size=SIZES["image_size"])
    cf, K = gen.maskgit_cf, SIZES["codebook_size"]
    rng = np.random.default_rng(0)

    images = (rng.integers(0, 256, (4, SIZES["image_size"], SIZES["image_size"], 3)) / 255.0).astype(np.float32)
    tok_model = gen.tokenizer_model
    tok_init = tok_model.init(jax.random.PRNGKey(1), images,
                              method=lambda m, x: m.decode_from_indices(m.encode_to_indices(x)))
    gen.tokenizer_variables = {"params": randomize(jax.device_get(tok_init["params"]), rng)}
    tokens0 = jnp.zeros((1, gen.transformer_block_size), jnp.int32)
    tr_init = gen.transformer_model.init(jax.random.PRNGKey(2), tokens0)
    gen.transformer_variables = {"params": randomize(jax.device_get(tr_init["params"]), rng)}

    arrays = {}
    ids = tok_model.apply(gen.tokenizer_variables, images, method=tok_model.encode_to_indices)
    pixels = tok_model.apply(gen.tokenizer_variables, ids, method=tok_model.decode_from_indices)
    arrays.update(images=images, ids=np.asarray(ids, np.int64), pixels=np.asarray(pixels))

    V, L1 = gen.transformer_codebook_size, gen.transformer_block_size
    codes = rng.integers(0, K, (4, L1))
    codes[:, 0] = K + np.array([0, 9, 5, 3])  # class tokens
    codes[0, 1:] = -1  # all masked
    codes[1, 1:][rng.random(L1 - 1) < 0.5] = -1  # half masked
    codes[3, 1:][rng.random(L1 - 1) < 0.5] = V - 1  # [MASK] written as its row
    arrays["logit_tokens"] = codes.astype(np.int64)
    arrays["logits"] = np.asarray(gen.transformer_model.apply(gen.transformer_variables, jnp.asarray(codes, jnp.int32),
                                                              deterministic=True))

    def tokens_to_logits(seq):  # what generate_samples does inside
        return gen.transformer_model.apply(gen.transformer_variables, seq, deterministic=True)[..., :K]

    def run(name, inputs, key, steps, start_iter=0, temperature=CHOICE_TEMPERATURE):
        cf.sample_choice_temperature = temperature
        seqs = parallel_decode.decode(inputs, key, tokens_to_logits, num_iter=steps, choice_temperature=temperature,
                                      mask_token_id=cf.transformer.mask_token_id, start_iter=start_iter)
        images_out = gen.generate_samples(inputs, key, start_iter=start_iter, num_iterations=steps)
        arrays[f"{name}_inputs"] = np.asarray(inputs, np.int64)
        arrays[f"{name}_seqs"] = np.asarray(seqs, np.int64)  # [B,T,L+1] sampled ids of every step
        arrays[f"{name}_pixels"] = np.asarray(images_out)
        arrays[f"{name}_meta"] = np.array([steps, start_iter], np.int64)
        arrays[f"{name}_temperature"] = np.float32(temperature)

    labels = np.arange(8) % SIZES["num_classes"]
    blank = np.concatenate([labels[:, None] + K, -np.ones((8, L1 - 1), np.int64)], axis=1)
    categorical = jax.random.categorical
    jax.random.categorical = lambda key, logits, axis=-1, **kw: jnp.argmax(logits, axis)  # zero temperature
    try:
        for steps in (8, 12, 16):
            run(f"det_T{steps}", jnp.asarray(blank, jnp.int32), jax.random.PRNGKey(3), steps, temperature=0.0)
    finally:
        jax.random.categorical = categorical

    key = jax.random.PRNGKey(0)
    run("noise_T12", jnp.asarray(blank[:4], jnp.int32), key, 12)
    arrays["noise_T12_sample"], arrays["noise_T12_choice"] = official_noise(jax, key, 12, (4, L1, K))

    side = SIZES["image_size"] // SIZES["patch_size"]
    box = np.zeros((side, side), bool)
    box[1:3, 1:4] = True
    edit = np.where(box.reshape(-1)[None], -1, np.asarray(ids).reshape(4, -1))
    edit = np.concatenate([np.array([[K + 1], [K + 2], [K + 7], [K + 7]]), edit], axis=1)
    run("edit_T12", jnp.asarray(edit, jnp.int32), key, 12, start_iter=2)
    arrays["edit_T12_sample"], arrays["edit_T12_choice"] = official_noise(jax, key, 10, (4, L1, K))

    arrays["sizes"] = np.array([SIZES[k] for k in SIZE_KEYS], np.int64)
    (out / "tokenizer_tiny.msgpack").write_bytes(serialization.to_bytes(gen.tokenizer_variables))
    (out / "transformer_tiny.msgpack").write_bytes(serialization.to_bytes(gen.transformer_variables))
    np.savez(out / "arrays.npz", **arrays)


SIZE_KEYS = ("codebook_size", "num_classes", "embed_dim", "depth", "num_heads", "intermediate_size", "image_size",
             "patch_size", "filters", "num_res_blocks", "embedding_dim")


# ----------------------------------------------------------------------------- main (the repo's interpreter)


def unpack_sources(mirror: Path, into: Path):
    """The official `maskgit/` package of the mirror's HEAD, unpacked into `into`."""
    archive = subprocess.run(["git", "-C", str(mirror), "archive", "HEAD", "maskgit"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, help="git dir of google-research/maskgit (bare is fine)")
    parser.add_argument("--jax-python", default="/tmp/jaxenv/bin/python", help="interpreter with JAX and Flax")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    if args.mirror is None:
        parser.error("--mirror is required")
    from libs.atomic_io import atomic_savez, atomic_write_bytes
    with tempfile.TemporaryDirectory() as tmp:
        src, raw = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        raw.mkdir()
        unpack_sources(args.mirror, src)
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="")
        subprocess.run([args.jax_python, str(Path(__file__).resolve()), "--worker", str(src), str(raw)],
                       check=True, env=env)
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer_tiny.msgpack", "transformer_tiny.msgpack"):
            atomic_write_bytes(args.out / name, (raw / name).read_bytes())
        with np.load(raw / "arrays.npz") as z:
            atomic_savez(args.out / "official.npz", {k: z[k] for k in sorted(z.files)}, compressed=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
