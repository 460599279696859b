"""How far a trained model's full depth moved from a reference model's (usually the untuned one it started
from): on held-out records, teacher-forced, the share of response positions where both models' top-1 tokens
agree, the mean KL(reference || model), and how often the first answer token is the same.

Perplexity on reference answers can stay flat while the model's own greedy chat changes; these three
figures measure the change itself, which is what a user who only ever chats at full depth notices.

    python -m sortedchat.training.drift --reference ~/.cache/sortedchat/models/smollm2-135m-instruct \\
        runs/smollm2-default default --data runs/data/heldout.json --limit 100 --max-length 256

Its records are picked as `sortedchat eval` and `calibrate` pick theirs (`data.last_records`): `--holdout N`
the last N (what `train --holdout N` left out), then at most `--limit` of them. Errors a user can fix end it
as they end a `sortedchat` command: one line, exit status 1.
"""

from __future__ import annotations

import argparse

import torch

from sortedchat.training.templates import IGNORE, Encoded


@torch.no_grad()
def response_logits(model, encoded: list[Encoded]) -> list[torch.Tensor]:
    """Each record's full-depth logits at its scored positions (those whose next token is a response token)."""
    out = []
    for e in encoded:
        select = (torch.tensor(e.labels[1:]) != IGNORE).nonzero().squeeze(1)
        logits = model(input_ids=torch.tensor([e.input_ids], device=model.device)).logits[0]
        out.append(logits[select.to(logits.device)].float().cpu())
    return out


def drift(reference: list[torch.Tensor], model: list[torch.Tensor]) -> dict[str, float]:
    """`top1`: share of positions whose top-1 tokens agree; `kl`: mean KL(reference || model) per position;
    `first`: share of records whose first scored position agrees."""
    n = sum(len(r) for r in reference)
    same = sum(int((r.argmax(-1) == m.argmax(-1)).sum()) for r, m in zip(reference, model))
    kl = sum(float(torch.nn.functional.kl_div(m.log_softmax(-1), r.log_softmax(-1), log_target=True,
                                               reduction="sum")) for r, m in zip(reference, model))
    scored = [(r, m) for r, m in zip(reference, model) if len(r)]
    first = sum(int(r[0].argmax() == m[0].argmax()) for r, m in scored)
    return {"top1": same / max(n, 1), "kl": kl / max(n, 1), "first": first / max(len(scored), 1), "positions": n}


def main(argv: list[str] | None = None) -> None:
    # Looked up when it runs, so that a test can stand in for the loader and the encoder.
    from sortedchat import SortedChatError
    from sortedchat.loading import LoadOptions, load_sorted_model
    from sortedchat.training.data import last_records, load_records
    from sortedchat.training.templates import encode_all

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model directories (or 'default') to compare with the reference")
    ap.add_argument("--reference", required=True, help="the model to measure the drift from (or 'default')")
    ap.add_argument("--data", required=True, help="held-out records (any format `sortedchat train` reads)")
    ap.add_argument("--holdout", type=int, default=0, help="use only the last N records (what `train --holdout N` "
                    "left out; 0 = all)")
    ap.add_argument("--limit", type=int, default=0, help="use at most N records, after --holdout (0 = all)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--template", default="chat")
    args = ap.parse_args(argv)
    try:
        records = last_records(load_records(args.data, False, "--data").examples, args.holdout, args.limit, args.data)

        def load(spec: str):
            return load_sorted_model(None if spec == "default" else spec, LoadOptions(device="cpu"))

        ref = load(args.reference)
        encoded, _ = encode_all(records, ref.tokenizer, args.template, args.max_length)
        reference = response_logits(ref.model, encoded)
        print("| model | top-1 same as reference | KL(reference ‖ model) | first answer token same |")
        print("|---|---|---|---|")
        for spec in args.models:
            sm = load(spec)
            d = drift(reference, response_logits(sm.model, encoded))
            print(f"| {spec} | {100 * d['top1']:.1f}% | {d['kl']:.4f} | {100 * d['first']:.0f}% |")
    except SortedChatError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
