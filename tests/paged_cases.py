"""Sequences in a paged KV cache for the paged tests: the same keys contiguous and in pages taken in
random order, the slots no sequence uses filled with NaN (so a kernel that reads one shows it)."""

import torch

from fastgpt.attention.paged import write_pages

H, H_KV, D = 4, 2, 16  # grouped-query: two query heads per key/value head


def scattered_pages(lengths, page_size, dtype, seed=0, kv_heads=H_KV, head_dim=D):
    """Sequences of these lengths, contiguous (total, H_kv, D) and in pages taken in random order."""
    g = torch.Generator().manual_seed(seed)
    pages_each = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_each) + 3  # a few pages no sequence uses
    order = torch.randperm(num_pages, generator=g).tolist()
    table = torch.zeros(len(lengths), max(pages_each), dtype=torch.int32)
    for b, n in enumerate(pages_each):
        table[b, :n] = torch.tensor(order[:n])
        order = order[n:]
    k = torch.randn(sum(lengths), kv_heads, head_dim, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(sum(lengths), kv_heads, head_dim, generator=g, dtype=torch.float64).to(dtype)
    # the slots no sequence holds are NaN: never read
    k_pages = torch.full((num_pages, page_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_pages = k_pages.clone()
    seq_lens = torch.tensor(lengths)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    write_pages(k_pages, v_pages, table, seq_lens, k, v, cu)
    return k, v, k_pages, v_pages, table, seq_lens
