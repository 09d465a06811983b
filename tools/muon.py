"""The Muon baseline on the paper's split, for train.py --optimizer muon and tools.experiments compare."""
import torch

from sinkgd import SinkGD


class MuonAdamW(SinkGD):
    """torch.optim.Muon on the matrices SinkGD would get (the groups with sinkgd=True), its momentum buffers kept in
    this optimizer's state; SinkGD's fused AdamW on the rest. So one schedule, checkpoint and non-finite skip serve
    both. Muon takes no found_inf: a non-finite step is decided on the host before it, and skips everything."""

    def __init__(self, params, momentum: float = 0.95, adjust_lr_fn: str | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.muons = [torch.optim.Muon(group["params"], momentum=momentum, adjust_lr_fn=adjust_lr_fn)
                      if group["sinkgd"] else None for group in self.param_groups]

    def _sinkgd_update(self, group: dict, found_inf) -> None:
        if found_inf is not None and found_inf.item():
            return
        # paired by position: load_state_dict replaces the group dicts, so a key by id would not last
        muon = next(m for g, m in zip(self.param_groups, self.muons) if g is group)
        muon.param_groups[0].update(lr=group["lr"], weight_decay=group["weight_decay"])  # as the schedule set them
        muon.state = self.state  # its buffers saved and loaded with this optimizer's state
        muon.step()
