"""The free queue: the links of its doubly linked list after every operation, and the order
the pool keeps in it (uncached blocks at the head, cached ones at the tail).

``links`` reads the queue head to tail as (prev, block, next) ids, the sentinels named
``"head"`` and ``"tail"``, so one assertion pins every pointer of every free block; a block
that left the queue must hold no link at all, or a later insertion would splice it twice.
"""

import pytest

from engine.kv import BlockHash, BlockPool, FreeBlockQueue, KVBlock


def make_queue(num_blocks):
    blocks = [KVBlock(block_id=i) for i in range(num_blocks)]
    return FreeBlockQueue(blocks), blocks


def links(queue):
    """(prev, block, next) of each free block, head to tail; also checks the way back."""

    def name(node):
        if node is queue._head:
            return "head"
        return "tail" if node is queue._tail else node.block_id

    forward = list(queue)
    backward = []
    node = queue._tail.prev_free
    while node is not queue._head:
        backward.append(node)
        node = node.prev_free
    assert backward[::-1] == forward, "the prev links do not retrace the next links"
    assert len(queue) == len(forward)
    return [(name(block.prev_free), block.block_id, name(block.next_free)) for block in forward]


def unlinked(block):
    return block.prev_free is None and block.next_free is None


def test_a_new_queue_links_its_blocks_in_the_order_given():
    queue, _ = make_queue(3)
    assert links(queue) == [("head", 0, 1), (0, 1, 2), (1, 2, "tail")]


def test_removing_a_middle_block_joins_its_neighbours_and_unlinks_it():
    queue, blocks = make_queue(3)
    queue.remove(blocks[1])
    assert links(queue) == [("head", 0, 2), (0, 2, "tail")]
    assert unlinked(blocks[1])


def test_removing_the_first_and_the_last_block_relinks_the_sentinels():
    queue, blocks = make_queue(3)
    queue.remove(blocks[0])
    queue.remove(blocks[2])
    assert links(queue) == [("head", 1, "tail")]
    assert unlinked(blocks[0]) and unlinked(blocks[2])


def test_append_links_a_block_after_the_last_one():
    queue, blocks = make_queue(3)
    queue.remove(blocks[0])
    queue.append(blocks[0])
    assert links(queue) == [("head", 1, 2), (1, 2, 0), (2, 0, "tail")]


def test_appendleft_links_a_block_before_the_first_one():
    queue, blocks = make_queue(3)
    queue.remove(blocks[2])
    queue.appendleft(blocks[2])
    assert links(queue) == [("head", 2, 0), (2, 0, 1), (0, 1, "tail")]
    assert queue.popleft() is blocks[2]


def test_appendleft_and_append_into_an_empty_queue():
    queue, blocks = make_queue(2)
    queue.popleft()
    queue.popleft()
    queue.appendleft(blocks[1])
    assert links(queue) == [("head", 1, "tail")]
    queue.append(blocks[0])
    assert links(queue) == [("head", 1, 0), (1, 0, "tail")]


def test_popleft_returns_the_head_block_unlinked():
    queue, blocks = make_queue(2)
    assert queue.popleft() is blocks[0]
    assert unlinked(blocks[0])
    assert links(queue) == [("head", 1, "tail")]
    assert queue.popleft() is blocks[1]
    assert links(queue) == []  # the sentinels point at each other again


def test_popping_an_empty_queue_raises_and_leaves_it_empty():
    queue, _ = make_queue(1)
    queue.popleft()
    with pytest.raises(IndexError, match="no free block left"):
        queue.popleft()
    assert links(queue) == []


@pytest.mark.parametrize("insert", ["append", "appendleft"])
def test_inserting_a_free_block_again_is_refused_by_name(insert):
    queue, blocks = make_queue(2)
    with pytest.raises(AssertionError, match=r"KVBlock\(id=1.*already free"):
        getattr(queue, insert)(blocks[1])
    assert links(queue) == [("head", 0, 1), (0, 1, "tail")]


def test_removing_a_block_that_is_not_free_is_refused_by_name():
    queue, blocks = make_queue(2)
    queue.remove(blocks[0])
    with pytest.raises(AssertionError, match=r"KVBlock\(id=0.*is not free"):
        queue.remove(blocks[0])
    assert links(queue) == [("head", 1, "tail")]


def test_the_pool_frees_uncached_blocks_to_the_head_in_the_order_given_and_cached_ones_to_the_tail():
    pool = BlockPool(6)
    blocks = pool.allocate(4)  # free queue: 4 5
    for block in blocks[:2]:
        pool.cache_block(block, BlockHash(bytes([block.block_id])), [block.block_id])
    pool.free([blocks[3], blocks[1], blocks[2], blocks[0]])  # 1 and 0 cached
    assert [block.block_id for block in pool.free_queue] == [3, 2, 4, 5, 1, 0]
    assert [block.block_id for block in pool.allocate(4)] == [3, 2, 4, 5]
    assert pool.num_evictions == 0
