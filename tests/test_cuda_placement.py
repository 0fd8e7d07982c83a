"""CUDA placement checked on this CPU-only machine: every forward path users run on GPUs, on fake CUDA tensors.

The real tiny models are moved with `.to("cuda")` inside `tests.fake_cuda.fake_cuda()` (as the scripts move
theirs) and their inputs made under `torch.device("cuda")`; the code under test then runs with no default
device, so a tensor it makes without `device=` lands on the CPU and the first op mixing it with a CUDA tensor
raises FakeTensorDeviceMismatchError, as on a GPU. What fake tensors do not check by themselves (a CPU index
into a CUDA tensor, a generator of the wrong device, sparse products, `.numpy()` of a CUDA tensor) the
instrument checks (PlacementError). Backward passes need a real CUDA context: training is covered up to the
loss. Where the code reads a value back (a tokenizer range check, NLL and features copied to the host), fake
tensors have no value to give: the instrument answers with a stand-in (0, zeros), so those checks run but
their outcome is not tested here; the device side of the path is.
"""
import contextlib

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError

from libs.evaluation.inception import FeatureExtractor, build_fid_inception
from libs.evaluation.nll import masked_nll
from libs.models.autonat import Embeddings
from libs.models.fusion_cache import FusionCache
from libs.models.ka_mig import GraphConfig, KAMIG
from libs.sampling import decoding
from libs.sampling.editing import encode_image
from libs.sampling.generation import sample_images
from libs.training.objective import make_masked_batch, masked_token_loss
from tests.fake_cuda import CUDA, PlacementError, cuda_autocast_allowed, fake_cuda
from tests.helpers import decoding_options, tiny_backbone, tiny_vqgan, token_model

K, L, C = 32, 16, 4  # tiny models: codebook, tokens, classes (null class C)
PLACEMENT_ERRORS = (FakeTensorDeviceMismatchError, PlacementError)


def is_fake_cuda(t) -> bool:
    return isinstance(t, FakeTensor) and t.device == CUDA


def cuda_batch(b=4):
    """(ids [b,L] with every third place [MASK], class ids [b] with one null class), made on cuda:0."""
    with torch.device("cuda"):
        ids = torch.randint(0, K, (b, L))
        ids[:, ::3] = K
        cls = torch.tensor([0, 1, C, 3][:b])
    return ids, cls


# ----------------------------------------------------------------------------- models


def test_tokenizer_encode_and_decode_stay_on_cuda():
    tokenizer = tiny_vqgan()
    with fake_cuda(strict=()) as fc:
        fc.to_cuda(tokenizer)
        with torch.device("cuda"):
            images = torch.rand(2, 3, 8, 8)
        ids = tokenizer.encode(images)
        out = tokenizer.decode(ids.flatten(1))
    assert is_fake_cuda(ids) and ids.shape == (2, 4, 4) and ids.dtype == torch.long
    assert is_fake_cuda(out) and out.shape == (2, 3, 8, 8)
    assert [r.what for r in fc.reads.reads] == ["device-to-host copy (.tolist)"]  # decode's one range check
    assert "vqgan.py" in fc.reads.reads[0].where


def test_backbone_inference_stays_on_cuda():
    model = tiny_backbone()
    with fake_cuda() as fc, torch.no_grad():
        fc.to_cuda(model)
        ids, cls = cuda_batch()
        fc.reads.phase = "steps"  # from here on a host read raises
        logits = model(ids, cls)
    assert is_fake_cuda(logits) and logits.shape == (4, L, K)


def test_backbone_pretraining_forward_and_loss_stay_on_cuda():
    model = tiny_backbone(dropout=0.1, use_checkpoint=True).train()  # train.mode=pretrain: dropout, checkpointing
    with fake_cuda() as fc:
        fc.to_cuda(model)
        ids, cls = cuda_batch()
        generator = fc.cuda_generators(1)[0]
        fc.reads.phase = "steps"
        batch = make_masked_batch(ids, cls, K, C, generator=generator)
        loss = masked_token_loss(model(batch.input_ids, batch.class_ids), batch)
    assert is_fake_cuda(loss) and loss.shape == () and loss.requires_grad


@pytest.mark.parametrize("graph_cfg", [GraphConfig(), GraphConfig(gnn="gat"), GraphConfig(use_co=False, use_sim=False),
                                       GraphConfig(use_incompat=False)], ids=["gcn", "gat", "G_p-only", "no-G_p"])
def test_ka_mig_training_forward_and_loss_stay_on_cuda(graph_cfg):
    model = token_model("ka_mig", graph_cfg).train()
    with fake_cuda() as fc:
        fc.to_cuda(model)
        ids, cls = cuda_batch()
        generator = fc.cuda_generators(1)[0]  # as Trainer.step_generators: one generator on the device
        fc.reads.phase = "steps"  # from here on a host read raises
        batch = make_masked_batch(ids, cls, K, C, p_uncond=0.5, generator=generator)
        loss = masked_token_loss(model(batch.input_ids, batch.class_ids), batch)
    assert is_fake_cuda(loss) and loss.shape == () and loss.requires_grad
    assert all(is_fake_cuda(t) for t in (batch.input_ids, batch.class_ids, batch.targets, batch.mask))


@pytest.mark.parametrize("gnn", ["gcn", "gat"])
def test_fusion_cache_stays_on_cuda(gnn):
    model = token_model("ka_mig", GraphConfig(gnn=gnn))
    with fake_cuda(strict=()) as fc, torch.no_grad():
        fc.to_cuda(model)
        cache = FusionCache(model)
        ids, cls = cuda_batch()
        logits = cache(ids, cls)
    assert is_fake_cuda(cache.tables) and cache.tables.shape[1:] == (K + 1, 32)
    assert is_fake_cuda(logits) and logits.shape == (4, L, K)


# ----------------------------------------------------------------------------- decoding runs


SCHEDULES = decoding_options()


def sampled_on_cuda(kind, schedule, precision="fp32", generators="per-sample", edit=False, spy=False):
    """sample_images (decoding, tokenizer decode, pixels to the host) of a fake-CUDA model; returns the images
    (and the Spy around the token model when `spy`)."""
    model, tokenizer = token_model(kind), tiny_vqgan()
    with fake_cuda(strict=()) as fc, torch.no_grad():
        fc.to_cuda(model)
        fc.to_cuda(tokenizer)
        sampler = FusionCache(model) if kind == "ka_mig" else model
        sampler = Spy(sampler) if spy else sampler
        _, cls = cuda_batch()
        gens = {"per-sample": fc.cuda_generators(4), "one": fc.cuda_generators(1)[0], "none": None}[generators]
        init_ids = known = None
        if edit:  # generate_img.py --edit: the image's tokens, the unknown places decoded
            image = np.zeros((8, 8, 3), dtype=np.uint8)
            ids = encode_image(tokenizer, image, CUDA)  # [L]
            assert is_fake_cuda(ids)
            known = torch.as_tensor(np.arange(L) % 2 == 0, device=CUDA)
            init_ids, known = ids.expand(4, -1), known.expand(4, -1)
        with cuda_autocast_allowed() if precision != "fp32" else contextlib.nullcontext():
            images = sample_images(sampler, tokenizer, cls, schedule, gens, precision, init_ids=init_ids,
                                   known=known)
    return (images, sampler) if spy else images


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_decoding_option_runs_on_cuda(name):
    images = sampled_on_cuda("ka_mig", SCHEDULES[name])  # KA-MIG through its FusionCache, as the scripts
    assert isinstance(images, np.ndarray) and images.shape == (4, 8, 8, 3) and images.dtype == np.uint8


def test_backbone_decoding_runs_on_cuda():
    assert sampled_on_cuda("autonat", SCHEDULES["autonat"]).shape == (4, 8, 8, 3)


class Spy:
    """A token model that notes, per call, whether CUDA autocast was on and its logits' dtype."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, ids, class_ids):
        out = self.model(ids, class_ids)
        self.seen.append((torch.is_autocast_enabled("cuda"), out.dtype))
        return out


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_decoding_under_autocast_runs_on_cuda(precision, dtype):
    images, spy = sampled_on_cuda("ka_mig", SCHEDULES["maskgit-linear"], precision, spy=True)
    assert images.shape == (4, 8, 8, 3)
    assert spy.seen == [(True, dtype)] * 4  # every step ran under CUDA autocast of that dtype


@pytest.mark.parametrize("generators", ["one", "none"])
def test_decoding_with_one_or_no_generator_runs_on_cuda(generators):
    assert sampled_on_cuda("ka_mig", SCHEDULES["maskgit-linear"], generators=generators).shape == (4, 8, 8, 3)


@pytest.mark.parametrize("kind", ["autonat", "ka_mig"])
def test_editing_runs_on_cuda(kind):
    assert sampled_on_cuda(kind, SCHEDULES["maskgit-linear"], edit=True).shape == (4, 8, 8, 3)


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("kind", ["autonat", "ka_mig", "cache"])
def test_heldout_nll_runs_on_cuda(kind):
    model = token_model("autonat" if kind == "autonat" else "ka_mig").eval()
    tokens = np.random.default_rng(0).integers(0, K, (5, L))
    labels = np.arange(5) % C
    with fake_cuda(strict=()) as fc, torch.no_grad():
        fc.to_cuda(model)
        nll = masked_nll(FusionCache(model) if kind == "cache" else model, tokens, labels, [0.3, 1.0],
                         batch_size=2, device=CUDA)
    assert nll.shape == (5, 2) and nll.dtype == np.float64
    copies = [r for r in fc.reads.reads if r.what == "device-to-host copy"]
    assert len(copies) == 3 * 2  # one per batch and ratio, the NLL values only


def test_inception_features_run_on_cuda():
    net = build_fid_inception()  # random weights: no download, no asset
    with fake_cuda(strict=()) as fc:
        extractor = fc.to_cuda(FeatureExtractor(net, "random weights", has_logits=True))
        assert extractor.device == CUDA
        images = np.zeros((2, 8, 8, 3), dtype=np.uint8)  # what generate_npz.py hands over
        x = extractor.preprocess(images)
        pool, logits = extractor.features(images)
    assert is_fake_cuda(x) and x.shape == (2, 3, 299, 299)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)


# ----------------------------------------------------------------------------- the checks bite


def test_a_cpu_tensor_planted_in_the_backbone_is_caught(monkeypatch):
    real = Embeddings.forward
    monkeypatch.setattr(Embeddings, "forward", lambda self, ids: real(self, ids) + torch.zeros(self.LayerNorm.weight.shape))
    model = tiny_backbone()
    with fake_cuda(strict=()) as fc, pytest.raises(FakeTensorDeviceMismatchError):
        fc.to_cuda(model)
        model(*cuda_batch())


def test_a_cpu_tensor_planted_in_decoding_is_caught(monkeypatch):
    monkeypatch.setattr(decoding, "halton_priority", lambda seq_len, device: -torch.arange(seq_len).float())
    with pytest.raises(PLACEMENT_ERRORS):
        sampled_on_cuda("autonat", SCHEDULES["maskgit-halton"])


def test_noise_drawn_off_the_generators_device_is_caught(monkeypatch):
    monkeypatch.setattr(decoding, "uniform", lambda shape, generator, device: torch.stack(
        [torch.rand(shape[1:], generator=g) for g in generator]).to(device))  # drawn on the CPU, then moved
    with pytest.raises(PlacementError, match="generator"):
        sampled_on_cuda("autonat", SCHEDULES["maskgit-linear"])


def test_a_cpu_graph_planted_in_ka_mig_is_caught(monkeypatch):
    def adjacency_on_cpu(self, name):  # the graph's index and weights left on the host
        index, weight = getattr(self, f"{name}_adj_index").cpu(), getattr(self, f"{name}_adj_weight").cpu()
        return torch.sparse_coo_tensor(index, weight, (K, K), check_invariants=False, is_coalesced=True)

    monkeypatch.setattr(KAMIG, "adjacency", adjacency_on_cpu)
    model = token_model("ka_mig")
    with fake_cuda(strict=()) as fc, torch.no_grad(), pytest.raises(PlacementError, match="sparse product"):
        fc.to_cuda(model)
        FusionCache(model)


def test_a_cpu_index_planted_in_ka_mig_is_caught(monkeypatch):
    real = KAMIG.class_prior
    monkeypatch.setattr(KAMIG, "class_prior", lambda self, class_ids: real(self, class_ids.cpu()))
    model = token_model("ka_mig").train()
    with fake_cuda(strict=()) as fc, pytest.raises(PLACEMENT_ERRORS):
        fc.to_cuda(model)
        model(*cuda_batch())


# ----------------------------------------------------------------------------- MaskGIT and KA-MaskGIT


MASKGIT_MASK = K + C  # MaskGIT's [MASK] id: after the codebook and the class tokens


def maskgit_cuda_batch(b=4):
    """cuda_batch with MaskGIT's [MASK] id at every third place."""
    ids, cls = cuda_batch(b)
    return torch.where(ids == K, torch.full_like(ids, MASKGIT_MASK), ids), cls


@pytest.mark.parametrize("kind", ["maskgit", "ka_maskgit"])
def test_maskgit_inference_stays_on_cuda(kind):
    model = token_model(kind)
    with fake_cuda() as fc, torch.no_grad():
        fc.to_cuda(model)
        ids, cls = maskgit_cuda_batch()
        cache = FusionCache(model) if kind == "ka_maskgit" else None
        if cache is not None:
            cache.prepare_classes(cls)  # the sampler's preparation: the batch's classes read once, before the steps
        fc.reads.phase = "steps"  # from here on a host read raises
        logits = model(ids, cls)
        cached = cache(ids, cls) if cache is not None else logits
    assert is_fake_cuda(logits) and logits.shape == (4, L, K) and is_fake_cuda(cached)


@pytest.mark.parametrize("kind", ["maskgit", "ka_maskgit"])
def test_maskgit_training_forward_and_loss_stay_on_cuda(kind):
    """Pretraining (MaskGIT: dropout, activation checkpointing) and KA training with the release's objective."""
    model = token_model(kind, dropout=0.1, use_checkpoint=kind == "maskgit").train()
    with fake_cuda() as fc:
        fc.to_cuda(model)
        ids, cls = cuda_batch()
        generator = fc.cuda_generators(1)[0]
        fc.reads.phase = "steps"
        batch = make_masked_batch(ids, cls, MASKGIT_MASK, C, p_uncond=0.0, generator=generator, schedule="cosine",
                                  min_rate=0.5, average="samples")
        loss = masked_token_loss(model(batch.input_ids, batch.class_ids), batch, 0.1)
    assert is_fake_cuda(loss) and loss.shape == () and loss.requires_grad
    assert all(is_fake_cuda(t) for t in (batch.input_ids, batch.class_ids, batch.targets, batch.mask))


def maskgit_decoded_on_cuda(kind, precision="fp32", generators="per-sample", edit=False, **kw):
    """libs.sampling.maskgit_decode.decode (the release's sampler, 4 steps) of a fake-CUDA model (KA-MaskGIT
    through its FusionCache); `edit`: known ids kept, decoding from step 2 (the release's editing). Returns the
    ids."""
    from libs.sampling.maskgit_decode import decode as release_decode
    model = token_model(kind)
    with fake_cuda(strict=()) as fc, torch.no_grad():
        fc.to_cuda(model)
        sampler = FusionCache(model) if kind == "ka_maskgit" else model
        _, cls = cuda_batch()
        gens = {"per-sample": fc.cuda_generators(4), "one": fc.cuda_generators(1)[0], "none": None}[generators]
        if edit:
            with torch.device("cuda"):
                kw.update(init_ids=torch.randint(0, K, (4, L)), known=(torch.arange(L) % 2 == 0).expand(4, -1),
                          start_iter=2)
        with cuda_autocast_allowed() if precision != "fp32" else contextlib.nullcontext():
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
            with torch.autocast("cuda", dtype=dtype, enabled=precision != "fp32"):
                return release_decode(sampler, cls, seq_len=L, mask_token_id=MASKGIT_MASK, steps=4,
                                      null_class_id=C, generator=gens, **kw)


@pytest.mark.parametrize("kind,option", [("maskgit", "plain"), ("maskgit", "fp16"), ("maskgit", "edit"),
                                         ("ka_maskgit", "guided"), ("ka_maskgit", "bf16"),
                                         ("ka_maskgit", "one-generator")])
def test_maskgit_decode_runs_on_cuda(kind, option):
    kw = {"plain": {}, "guided": {"guidance": [0.5, 1.0, 1.5, 2.0]}, "bf16": {"precision": "bf16"},
          "fp16": {"precision": "fp16"}, "one-generator": {"generators": "one"}, "edit": {"edit": True}}[option]
    ids = maskgit_decoded_on_cuda(kind, **kw)
    assert is_fake_cuda(ids) and ids.shape == (4, L) and ids.dtype == torch.long
