"""One shuffle window in memory: its shards, their chunks (the samples), the in-window order.

The stream (dataset.py) holds one window at a time (two at a boundary). Inside it, shards are
laid end to end, so sentence, document and token indices are window-global; :class:`Segments`
(samples.py) are expressed in these coordinates, and this class turns them back into rows
(:meth:`ShuffleWindow.assemble`) and into shard/document provenance (:meth:`ShuffleWindow.provenance`).
"""

from __future__ import annotations

import numpy as np

from ptft_dist.corpus.format import ShardData
from ptft_dist.stream.samples import Segments, assemble, assemble_packed, p_next_for_chunks
from ptft_dist.stream.spec import SpecialIds


class ShuffleWindow:
    """The shards of one shuffle window, their chunks, and the in-window permutation."""

    def __init__(self, w: int, shard_idx: list[int], datas: list[ShardData], chunks: list[tuple], id_base: np.ndarray,
                 perm_seed: list[int]):
        self.w = w
        self.shards = shard_idx
        self.tokens = [d.tokens for d in datas]
        self.doc_ids = [d.doc_ids for d in datas]
        tok_n = np.array([d.num_tokens for d in datas], dtype=np.int64)
        sent_n = np.array([d.num_sentences for d in datas], dtype=np.int64)
        doc_n = np.array([d.num_docs for d in datas], dtype=np.int64)
        self.tok_base = np.concatenate([[0], np.cumsum(tok_n)])
        self.sent_base = np.concatenate([[0], np.cumsum(sent_n)])
        self.doc_base = np.concatenate([[0], np.cumsum(doc_n)])
        self.sent_cs = np.concatenate(
            [d.sentence_offsets[:-1].astype(np.int64) + self.tok_base[i] for i, d in enumerate(datas)]
            + [self.tok_base[-1:]]
        )
        self.doc_off = np.concatenate(
            [d.doc_offsets[:-1].astype(np.int64) + self.sent_base[i] for i, d in enumerate(datas)]
            + [self.sent_base[-1:]]
        )
        st, en, tg, dc, pn, ids, roff = [], [], [], [], [], [], []
        chunk_base = 0
        for i, (d, (s0, s1, t, row_off)) in enumerate(zip(datas, chunks)):
            st.append(s0 + self.sent_base[i])
            en.append(s1 + self.sent_base[i])
            tg.append(t)
            dc.append(np.searchsorted(d.doc_offsets.astype(np.int64), s0, side="right") - 1 + self.doc_base[i])
            pn.append(np.full(len(s0), p_next_for_chunks(s1 - s0)))
            ids.append(id_base[shard_idx[i]] + np.arange(len(row_off) - 1, dtype=np.int64))
            roff.append(row_off[:-1] + chunk_base)
            chunk_base += len(s0)
        cat = (lambda xs, dt=np.int64: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))  # noqa: E731
        # c_*: per chunk; c_id: per sample. A sample is one chunk, or with packed rows the chunks
        # row_off[k]:row_off[k + 1] (window-global chunk indices).
        self.c_start, self.c_end, self.c_target, self.c_doc = cat(st), cat(en), cat(tg), cat(dc)
        self.c_pnext, self.c_id = cat(pn, np.float64), cat(ids)
        self.row_off = np.concatenate([cat(roff), [chunk_base]]).astype(np.int64)
        self.n = len(self.c_id)
        self.perm = np.random.default_rng(perm_seed).permutation(self.n) if self.n else np.zeros(0, np.int64)

    def shard_of_sentence(self, s: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.sent_base, s, side="right") - 1

    def shard_of_doc(self, d: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.doc_base, d, side="right") - 1

    def assemble(self, seg: Segments, specials: SpecialIds, nsp: bool, ids: np.ndarray, types: np.ndarray,
                 rows: np.ndarray) -> None:
        """Write ``[CLS] A [SEP] (B [SEP])`` of each sample into ``ids``/``types`` at ``rows``; A and B
        may lie in different shards of the window, so each is copied from its own shard's tokens."""
        src_a = self.shard_of_sentence(seg.a_sent[:, 0])
        src_b = np.where(seg.lb > 0, self.shard_of_sentence(np.minimum(seg.b_sent[:, 0], len(self.sent_cs) - 2)), 0)
        assemble(seg, self.tokens, self.tok_base, src_a, src_b, specials, nsp, ids, types, rows)

    def chunks_of_rows(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The chunks of packed rows ``c``, in row order: (row each belongs to, as an index into ``c``;
        its place in the row; its chunk index)."""
        n_parts = self.row_off[c + 1] - self.row_off[c]
        part_of = np.repeat(np.arange(len(c)), n_parts)
        place = np.arange(len(part_of)) - np.repeat(np.cumsum(n_parts) - n_parts, n_parts)
        return part_of, place, self.row_off[c][part_of] + place

    def assemble_packed(self, seg: Segments, specials: SpecialIds, ids: np.ndarray, rows: np.ndarray,
                        part_of: np.ndarray) -> None:
        """Write each chunk of packed rows end to end in its row ``rows[part_of]`` (``samples.assemble_packed``)."""
        cost = 2 + seg.la
        per_row = np.bincount(part_of, minlength=len(rows))
        col = np.cumsum(cost) - cost
        col -= col[np.cumsum(per_row) - per_row][part_of]  # from the row's first chunk
        src = self.shard_of_sentence(seg.a_sent[:, 0])
        assemble_packed(seg, self.tokens, self.tok_base, src, specials, ids, rows[part_of], col)

    def provenance(self, seg: Segments, j: int, sample_id: int) -> dict:
        """Where segment ``j`` of a group came from: shard, document, sentences (counted within the
        document), and the tokens truncation removed; see ``PretrainingStream.describe``."""
        a_sh = int(self.shard_of_doc(seg.a_doc[j]))
        a_docl = int(seg.a_doc[j] - self.doc_base[a_sh])
        a_first = int(self.doc_off[seg.a_doc[j]])
        rec = {
            "sample_id": int(sample_id),
            "nsp_label": int(seg.nsp_label[j]),
            "a_shard": self.shards[a_sh],
            "a_doc": a_docl,
            "a_doc_id": int(self.doc_ids[a_sh][a_docl]),
            "a_sentences": (int(seg.a_sent[j, 0] - a_first), int(seg.a_sent[j, 1] - a_first)),
            "b_shard": None, "b_doc": None, "b_doc_id": None, "b_sentences": None,
            "truncated": tuple(int(x) for x in seg.trunc[j]),
        }
        if seg.b_doc[j] >= 0 and seg.b_sent[j, 1] > seg.b_sent[j, 0]:
            b_sh = int(self.shard_of_doc(seg.b_doc[j]))
            b_docl = int(seg.b_doc[j] - self.doc_base[b_sh])
            b_first = int(self.doc_off[seg.b_doc[j]])
            rec.update(
                b_shard=self.shards[b_sh], b_doc=b_docl, b_doc_id=int(self.doc_ids[b_sh][b_docl]),
                b_sentences=(int(seg.b_sent[j, 0] - b_first), int(seg.b_sent[j, 1] - b_first)),
            )
        return rec

    def describe(self, seg: Segments, c: np.ndarray, rows: np.ndarray, part_of: np.ndarray | None,
                 positions: np.ndarray, out: list[dict]) -> None:
        """Fill ``out[row]`` with the provenance of the group's samples (packed rows: the first
        chunk's fields, and ``parts``: every chunk's); see ``PretrainingStream.describe``."""
        if part_of is None:
            for j, row in enumerate(rows.tolist()):
                out[row] = {"position": int(positions[row]), **self.provenance(seg, j, self.c_id[c[j]])}
            return
        for j, i in enumerate(part_of.tolist()):
            part = self.provenance(seg, j, self.c_id[c[i]])
            rec = out[int(rows[i])]
            if not rec:
                rec.update(position=int(positions[rows[i]]), **part, parts=[])
            rec["parts"].append(part)
