import torch

from hf_chts.profiling import OpCounter, PeakLiveBytes


def test_op_counter_counts_host_reads():
    with OpCounter() as counter:
        x = torch.arange(6.0)
        _ = x.sum()  # no read
        _ = int(x.sum())  # one read
        _ = x[x > 2]  # boolean indexing: one read
    assert counter.syncs == 2, dict(counter.sync_ops)


def test_peak_live_bytes_counts_allocations_not_views_or_outside_tensors():
    outside = torch.zeros(250)  # 1000 bytes, made before the block: never counted
    with PeakLiveBytes() as mem:
        a = torch.ones(1000)  # 4000 bytes
        view = a[::2].view(50, 10)  # a view: nothing new
        view.mul_(3.0)  # in place: nothing new
        outside.add_(1.0)
        part = outside[:10]  # a view of an outside tensor: not counted
        b = a.sum(dim=0, keepdim=True).expand(1000).contiguous()  # 4 + 4000 bytes, the first one freed
        del a, view  # a is freed once its view is: 4000 bytes of temporary
        c = torch.empty(500, dtype=torch.bool)  # 500 bytes, a result
    assert mem.peak == 4000 + 4 + 4000  # a, its sum and b; c comes after a is freed
    assert mem.live == 4000 + 500  # b and c
    assert mem.peak_temporary == 4000 + 4
    assert torch.equal(b, torch.full((1000,), 2000.0)) and part.shape == (10,) and c.numel() == 500


def test_peak_live_bytes_temporaries_exclude_results_made_before_the_peak():
    # Results piling up (as an update's masks do) are not part of the working set, whenever they are made.
    with PeakLiveBytes() as mem:
        results = []
        for _ in range(4):
            scratch = torch.zeros(1000)  # 4000 bytes, freed at the next iteration
            results.append(scratch.to(torch.bool))  # 1000 bytes each
        del scratch
    assert mem.live == 4000 and mem.peak_temporary == 8000  # two scratches alive during the reassignment
