"""Train a small OPT-architecture model from scratch, offline, for the compression accuracy study.

    python benchmark/train_small_opt.py --out ~/small-opt   # about 15 minutes on 2 CPU cores

The text is the Python standard library's sources (benchmark/stdlib_corpus.py); the tokenizer is a
byte-level BPE trained on it. Everything is seeded, so the same command makes the same model. The
result is a Hugging Face checkpoint with its tokenizer and the held-out token ids (heldout.pt).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stdlib_corpus import corpus  # noqa: E402


def train_tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--corpus-mb", type=float, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(args.seed)
    train_text, held_text = corpus(int(args.corpus_mb * 1e6))
    tokenizer = train_tokenizer(train_text, args.vocab)
    encode = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    train_ids, held_ids = encode(train_text), encode(held_text)
    print(f"corpus: {len(train_ids):,} training tokens, {len(held_ids):,} held-out tokens")

    config = OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, ffn_dim=4 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=512,
                       word_embed_proj_dim=args.hidden, dropout=0.0, attention_dropout=0.0,
                       pad_token_id=1, bos_token_id=2, eos_token_id=2)
    model = OPTForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=g)
        batch = torch.stack([train_ids[s:s + args.seq_len] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}  ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        chunk = held_ids[:args.seq_len * 16].view(16, args.seq_len)
        print(f"held-out loss (fp32): {model(input_ids=chunk, labels=chunk).loss.item():.3f}")
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    torch.save(held_ids, os.path.join(args.out, "heldout.pt"))
    print(f"saved to {args.out} after {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
