"""Knowledge-augmented inference (KA-MIG, KA-MaskGIT, any KnowledgeHost) with the weight-dependent fusion terms
computed once (the sampler's fast path).

`FusionCache(model)` snapshots what depends only on the weights and the graphs: the fusion tables
([P,K+1,dim], `KnowledgeHost.fusion_tables`). Per batch it computes the G_p terms of the batch's distinct classes once
and reuses them while the class ids stay the same (all steps of one decoding run). The rule: a cache describes
the weights it was built from; after changing them in place, call `refresh()` (or build a new cache). Replacing
the graphs (`set_graphs`) or moving the model to another device or dtype is detected and refused until
`refresh()`. It refuses to run while the model trains or gradients are on, where `model(...)` is the exact
differentiable path.
"""
import torch

from libs.models.knowledge import KnowledgeHost, stacked_convs


class FusionCache:
    """Callable like the model, (ids [B,L], class_ids [B]) -> logits [B,L,K], for inference only."""

    def __init__(self, model: KnowledgeHost):
        if not isinstance(model, KnowledgeHost):
            raise TypeError(f"FusionCache needs a knowledge-augmented model (KAMIG, KAMaskGIT or another "
                            f"KnowledgeHost), got {type(model).__name__}")
        model.require_graphs()
        self.model = model
        self.refresh()

    # the attributes the sampler reads from a model
    @property
    def cfg(self):
        return self.model.cfg

    @property
    def mask_token_id(self) -> int:
        return self.model.mask_token_id

    @property
    def null_class_id(self) -> int:
        return self.model.null_class_id

    @torch.no_grad()
    def refresh(self):
        """Recomputes the fusion tables from the model's current weights; forgets the class terms."""
        self.tables = self.model.fusion_tables()  # [P,K+1,dim] or None
        self.class_key, self.class_terms = None, None
        self.class_arg = None  # (tensor, version) of the last call's class ids, to reuse terms without a read
        self.built_for = self.model_state()

    def model_state(self) -> tuple:
        """What a refresh() depends on besides in-place weight values: graph buffers, device, dtype."""
        weight = self.model.node_features()  # the host's word embedding: its device and dtype
        graphs = tuple(buf.data_ptr() for name, buf in self.model.named_buffers() if not name.startswith("token_emb"))
        return weight.device, weight.dtype, graphs

    def same_class_tensor(self, class_ids) -> bool:
        """True when `class_ids` is the very tensor of the last call, unchanged in place since."""
        last = self.class_arg
        return (last is not None and last[0] is class_ids and not class_ids.is_inference()
                and last[1] == class_ids._version)

    @torch.no_grad()
    def terms_for(self, class_ids):
        """([P,U,L,dim], inverse [B]): zero_convs_pos[p](P_class) for the U distinct classes of class ids [B].

        The very tensor of the last call, unchanged, reuses the terms without looking at the ids (the decoder
        passes one tensor to every step: no GPU sync); other tensors are compared with the last ids (a host
        read) and the terms recomputed when they differ (torch.unique: another).
        """
        if self.same_class_tensor(class_ids):
            return self.class_terms
        arg, class_ids = class_ids, class_ids.view(-1)
        if self.class_key is None or not torch.equal(self.class_key, class_ids):
            classes, inverse = class_ids.unique(return_inverse=True)
            with torch.autocast(class_ids.device.type, enabled=False):
                prior = self.model.class_prior(classes).float()  # [U,L,dim]
                weight, bias = stacked_convs(self.model.graph_layer.zero_convs_pos)  # [P,dim,dim], [P,dim]
                terms = torch.einsum("uld,ped->pule", prior, weight) + bias[:, None, None]  # [P,U,L,dim]
            self.class_key, self.class_terms = class_ids.clone(), (terms, inverse)
        self.class_arg = None if arg.is_inference() else (arg, arg._version)
        return self.class_terms

    def prepare_classes(self, class_ids):
        """Computes the class terms of class ids [B] now (the decoder calls it before its first step); nothing
        when G_p is off (there are no class terms)."""
        if self.model.graph_cfg.use_incompat:
            self.terms_for(class_ids)

    def __call__(self, ids, class_ids):
        model = self.model
        if model.training or torch.is_grad_enabled():
            raise RuntimeError("FusionCache is for inference (eval mode, torch.no_grad()); "
                               "call the model itself to train")
        if self.model_state() != self.built_for:
            raise RuntimeError("the model's graphs, device or dtype changed since this FusionCache was built; "
                               "call refresh()")
        negative = None
        if model.graph_cfg.use_incompat:
            terms, inverse = self.terms_for(class_ids)  # the argument itself: a view would be a new tensor
            negative = lambda point, dtype: terms[point].index_select(0, inverse)  # noqa: E731 - [B,L,dim]
        inject = model.fused_injection(ids, self.tables, negative)
        return model.run_with_injection(ids, class_ids.view(-1), inject)
