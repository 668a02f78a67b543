"""A Llama-style model generating (transformers LlamaForCausalLM from a
LlamaConfig: 8 layers, hidden 1024, 16 heads over 4 KV heads (GQA), random
weights, bf16): a batch of 4 random 512-token prompts, 128 new tokens by
greedy decoding, EOS suppressed; a cold request, then warm ones. Per
request: the generated tokens and the time (device-synchronised); then
peak reserved and allocated bytes.

    python scripts/torch/llama_generate.py --allocator inflight --steps 2

--steps is the number of requests (the first is the cold one).
"""

import hashlib

import common


def main():
    p = common.parser(__doc__, steps=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    args = p.parse_args()
    args.warmup = min(args.warmup, 1)
    torch = common.setup(args)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).cuda().eval()
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, config.vocab_size, (args.batch, args.prompt), generator=gen).cuda()
    mask = torch.ones_like(prompt)
    tokens, times, digests = [], [], []

    def request():
        with torch.inference_mode():
            return model.generate(
                input_ids=prompt,
                attention_mask=mask,
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                pad_token_id=0,
            )

    for i in range(args.steps):
        out, ms = common.sync_time(torch, request)
        new = out[:, args.prompt :].cpu()
        tokens.append(new.tolist())
        digests.append(hashlib.sha256(new.numpy().tobytes()).hexdigest()[:16])
        times.append(ms)
        print(f"request {i} ({'cold' if i == 0 else 'warm'}) {ms:9.2f} ms tokens {digests[-1]}", flush=True)
    r = common.header(torch, args, "llama_generate")
    r.update(
        batch=args.batch,
        prompt=args.prompt,
        new_tokens=args.new,
        tokens=tokens,
        token_digests=digests,
        request_ms=times,
        cold_ms=times[0] if times else None,
        warm_ms=common.median_after(times, 1) if len(times) > 1 else None,
        memory=common.memory(torch, args),
    )
    common.emit(r)


if __name__ == "__main__":
    main()
