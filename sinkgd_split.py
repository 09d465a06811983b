"""The paper's split of a model's parameters (arXiv 2502.06742): SinkGD for the transformer blocks'
linear maps, AdamW for the embedding, norms and head. For models nobody here wrote too: routers,
expert stacks, encoder-decoders, and `layouts` for what the rule cannot know. `sinkgd` re-exports
it."""
import fnmatch
import warnings
from collections import defaultdict

from torch import Tensor, nn

# The number of experts in transformers' configs (DBRX's is in its ffn_config). A Linear with
# that many outputs is a router.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def expert_counts(config) -> set[int]:
    """The expert counts a model's config (or any of its sub-configs) states; none without one."""
    found, pending = set(), [config]
    while pending:
        config = pending.pop()
        fields = config if isinstance(config, dict) else getattr(config, "__dict__", {})
        for key, value in fields.items():
            if key in EXPERT_COUNT_KEYS and isinstance(value, int):
                found.add(value)
            elif isinstance(value, dict) or hasattr(value, "to_dict"):
                pending.append(value)
    return found


# What `layouts` may declare for a parameter: layout -> (its dimensions, stored (..., in, out)).
# Stacked experts or one matrix, stored (out, in) or (in, out); or that AdamW takes it.
LAYOUTS = {"out_in": (2, False), "in_out": (2, True),
           "experts_out_in": (3, False), "experts_in_out": (3, True), "adamw": (None, None)}


def routes(weight: Tensor, transposed: bool, experts: set[int]) -> bool:
    """A router or gate: a matrix with one row or one column (SR-Sinkhorn of it is sign(G)), or
    one with as many outputs as the model has experts."""
    outputs = weight.shape[-1] if transposed else weight.shape[-2]
    return min(weight.shape[-2:]) == 1 or weight.dim() == 2 and outputs in experts


def sinkgd_param_groups(model: nn.Module, blocks: nn.Module | list[nn.Module], lr: float,
                        alpha: float = 0.05, weight_decay: float = 0.0,
                        layouts: dict[str, str] | None = None) -> list[dict]:
    """The paper's split. SinkGD, at lr alpha * lr, takes every linear-map weight inside `blocks`
    (the transformer layers; a list for several stacks, e.g. an encoder's and a decoder's) except
    routers and gates:
      - nn.Linear, (out, in);
      - transformers' Conv1D (GPT-2), (in, out);
      - 3-D expert stacks whose module says how they are stored: transformers 5's is_transposed,
        (experts, in, out); else (experts, out, in).
    A router or gate is a matrix with one row or one column (SR-Sinkhorn of it is sign(G)), or
    with as many outputs as the model's config has experts. AdamW, at lr, takes all else
    (embedding, norms, biases, head, routers). It also takes what in `blocks` may be an expert
    stack of unknown layout (3-D, or 2-D outside nn.Linear with a multiple of the experts as
    rows), which a warning names. The rule goes by module role, not by dim() == 2: the embedding
    and head are matrices too.

    layouts: {parameter name or fnmatch pattern: one of LAYOUTS}, for what the rule cannot know;
    e.g. Llama4's experts, applied as x @ W: {"*.experts.*_proj": "experts_in_out"}. It overrides
    the rule, anywhere in `model`."""
    by_id = {id(p): (name, p) for name, p in model.named_parameters()}
    blocks = [blocks] if isinstance(blocks, nn.Module) else list(blocks)
    inside = {id(m) for block in blocks for m in block.modules()}
    if not {id(p) for block in blocks for p in block.parameters()} <= by_id.keys():
        raise ValueError("sinkgd_param_groups: `blocks` must be submodules of `model`")
    ends = [getattr(model, f"get_{end}_embeddings", lambda: None)() for end in ("input", "output")]
    if any(id(end) in inside for end in ends if end is not None):
        raise ValueError("sinkgd_param_groups: `blocks` holds the model's embedding or output "
                         "head, which AdamW takes; pass the module(s) holding the transformer "
                         "layers, e.g. model.model.layers")
    # A weight shared with an embedding (a tied head) is never a SinkGD matrix
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    experts = expert_counts(getattr(model, "config", None))
    found = {}  # id -> (weight, stored (..., in, out), or None if unknown)
    unknown = []  # weights that may be expert stacks of unknown layout
    for module in (m for block in blocks for m in block.modules()):
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            found[id(module.weight)] = module.weight, not isinstance(module, nn.Linear)
        elif not isinstance(module, (nn.modules.conv._ConvNd, nn.Embedding)):
            for p in module.parameters(recurse=False):
                if p.dim() == 3:
                    found[id(p)] = p, getattr(module, "is_transposed", None)
                elif p.dim() == 2 and any(len(p) > e and len(p) % e == 0 for e in experts):
                    unknown.append(p)  # perhaps experts flattened along the rows (DBRX's)
    for key, (weight, transposed) in list(found.items()):
        if key in embeddings or routes(weight, transposed, experts):
            del found[key]
        elif transposed is None:
            unknown.append(found.pop(key)[0])
    # flattened: id -> the number of experts a declared 2-D stack holds
    declared, flattened = declared_layouts(model, layouts or {}, experts)
    for key, layout in declared.items():
        found.pop(key, None)
        if layout != "adamw":
            found[key] = by_id[key][1], LAYOUTS[layout][1]
    if unknown := [by_id[id(p)][0] for p in unknown if id(p) not in declared]:
        warnings.warn(f"sinkgd_param_groups: AdamW for {', '.join(unknown)}: expert stacks of "
                      "unknown layout (3-D, or 2-D outside nn.Linear with a multiple of the "
                      "experts as rows); say which with layouts={name: 'experts_out_in' | "
                      "'experts_in_out' | 'adamw'}")
    matrices = [(p, t) for p, t in found.values() if p.requires_grad]
    if not matrices:
        raise ValueError("sinkgd_param_groups: no nn.Linear, Conv1D or 3-D expert weight inside "
                         f"the given {', '.join(type(b).__name__ for b in blocks)}; pass the "
                         "module that holds the transformer layers")
    # (stored (..., in, out), experts a 2-D stack is flattened from, or 0) -> weights
    by_layout = defaultdict(list)
    for p, transposed in matrices:
        by_layout[transposed, flattened.get(id(p), 0)].append(p)
    groups = [dict(params=params, sinkgd=True, transposed=transposed, lr=alpha * lr,
                   weight_decay=weight_decay) | (dict(experts=stacked) if stacked else {})
              for (transposed, stacked), params in sorted(by_layout.items())]
    chosen = {id(p) for p, _ in matrices}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    return groups + [dict(params=others, sinkgd=False, lr=lr, weight_decay=weight_decay)]


def describe_split(model: nn.Module, groups: list[dict], matrix_optimizer: str = "SinkGD") -> str:
    """One line: how many tensors and parameters each optimizer gets, by kind: SinkGD's (or what
    takes its groups) matrices and expert stacks, AdamW's routers and gates (as the split finds
    them) and the rest."""
    experts = expert_counts(getattr(model, "config", None))
    kinds = {matrix_optimizer: {"matrices": [], "expert stacks": []},
             "AdamW": {"routers and gates": [], "other tensors": []}}
    for group in groups:
        for p in group["params"]:
            if group.get("sinkgd", True):
                whole = p.dim() == 2 and not group.get("experts")
                kinds[matrix_optimizer]["matrices" if whole else "expert stacks"].append(p)
            elif p.dim() == 2 and routes(p, False, experts):
                kinds["AdamW"]["routers and gates"].append(p)
            else:
                kinds["AdamW"]["other tensors"].append(p)
    counts = {optimizer: [f"{len(ps)} {kind} ({sum(p.numel() for p in ps) / 1e6:.2f}M params)"
                          for kind, ps in by_kind.items() if ps]
              for optimizer, by_kind in kinds.items()}
    return " | ".join(f"{optimizer} {', '.join(parts)}" for optimizer, parts in counts.items()
                      if parts)


def declared_layouts(model: nn.Module, layouts: dict[str, str],
                     experts: set[int]) -> tuple[dict, dict]:
    """id(parameter) -> layout, for each parameter of `model` whose name matches a key of
    `layouts` (every key must match one, and its layout fit the parameter's dimensions); and
    id -> number of experts for the 2-D parameters declared expert stacks: flattened along the
    rows, by the one expert count of the config that divides them."""
    declared, flattened = {}, {}
    for pattern, layout in layouts.items():
        if layout not in LAYOUTS:
            raise ValueError(f"sinkgd_param_groups: layouts[{pattern!r}] = {layout!r}; choose one "
                             f"of {list(LAYOUTS)}")
        matched = [(name, p) for name, p in model.named_parameters()
                   if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"sinkgd_param_groups: layouts names {pattern!r}, which matches no "
                             "parameter of the model")
        for name, p in matched:
            counts = [e for e in experts
                      if p.dim() == 2 and layout.startswith("experts") and p.shape[0] % e == 0]
            if len(counts) == 1:
                flattened[id(p)] = counts[0]
            elif LAYOUTS[layout][0] not in (None, p.dim()):
                why = (" and the model's config states no one number of experts that divides its "
                       "rows" if p.dim() == 2 else "")
                raise ValueError(f"sinkgd_param_groups: layouts makes {name} {layout}, but it is "
                                 f"{p.dim()}-D{why}")
            declared[id(p)] = layout
    return declared, flattened


def check_group(group: dict, index: int) -> None:
    """A SinkGD param group (index: its place) holds matrices, and DTensors that SinkGD can read."""
    from sinkgd_dtensor import check_shards
    not_matrices = [tuple(p.shape) for p in group["params"] if p.dim() < 2]
    if group["sinkgd"] and not_matrices:
        raise ValueError(f"SinkGD groups take matrices only, got shapes {not_matrices}; put "
                         "them in a group with sinkgd=False (AdamW), e.g. via "
                         "sinkgd_param_groups()")
    for i, p in enumerate(group["params"] if group["sinkgd"] else []):
        check_shards(p, f"param group {index}'s tensor {i}", group)


def check_unchanged(param_groups: list[dict], shapes: list[list]) -> None:
    """A wrapper (DeepSpeed ZeRO, FSDP1) may have made a SinkGD group's matrices flat pieces."""
    for group, was in zip(param_groups, shapes):
        now = [tuple(p.shape) for p in group["params"]]
        if group["sinkgd"] and now != [tuple(s) for s in was]:
            raise RuntimeError(f"SinkGD: matrices {[tuple(s) for s in was][:3]} became "
                               f"tensors shaped {now[:3]}; SR-Sinkhorn of flat or sharded "
                               "pieces is sign descent, not Alg. 3: under DeepSpeed use "
                               "sinkgd_zero.ZeroSinkGD")
