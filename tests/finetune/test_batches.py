"""Which examples each rank takes: DistributedSampler-like training shards, length grouping."""

import numpy as np

from ptft_dist.finetune.batches import eval_shard, train_shard


def test_train_shard_is_distributed_sampler_like():
    one = train_shard(37, 0, 1, seed=3, epoch=1)
    assert sorted(one.tolist()) == list(range(37))
    shards = [train_shard(37, r, 2, seed=3, epoch=1) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 19 and set(np.concatenate(shards)) == set(range(37))
    # micro-batch i of 2 ranks x 8 == micro-batch i of 1 rank x 16 (global batch equal)
    for i in range(2):
        assert sorted(np.concatenate([s[i * 8:(i + 1) * 8] for s in shards])) == sorted(one[i * 16:(i + 1) * 16])
    assert not np.array_equal(train_shard(37, 0, 1, seed=3, epoch=2), one)


def test_length_grouping_keeps_global_batches_and_cuts_padding():
    lengths = np.random.default_rng(0).integers(3, 64, size=330)
    one = train_shard(330, 0, 1, seed=1, epoch=0, lengths=lengths, global_batch=15)
    assert sorted(one.tolist()) == list(range(330))
    shards = [train_shard(330, r, 3, seed=1, epoch=0, lengths=lengths, global_batch=15) for r in range(3)]
    assert {len(s) for s in shards} == {110}
    for i in range(22):  # micro-batch i (5 per rank) of 3 ranks == global batch i of 1 rank x 15
        got = np.concatenate([s[i * 5:(i + 1) * 5] for s in shards])
        assert sorted(got.tolist()) == sorted(one[i * 15:(i + 1) * 15].tolist())
    grouped = np.mean([lengths[one[i:i + 15]].max() for i in range(0, 330, 15)])
    shuffled = train_shard(330, 0, 1, seed=1, epoch=0)
    plain = np.mean([lengths[shuffled[i:i + 15]].max() for i in range(0, 330, 15)])
    assert grouped < 0.75 * plain
    assert not np.array_equal(one, train_shard(330, 0, 1, seed=1, epoch=1, lengths=lengths, global_batch=15))


def test_eval_shard_pads_every_rank_to_the_same_count():
    lengths = np.arange(7)
    shards = [eval_shard(7, r, 3, lengths) for r in range(3)]
    assert {len(s) for s in shards} == {3}  # ZeRO-3 forwards are collectives: equal batch counts
    assert set(np.concatenate(shards)) == set(range(7))
    assert all(list(lengths[s]) == sorted(lengths[s], reverse=True) for s in shards)  # longest first
    assert len(eval_shard(0, 0, 2)) == 0
