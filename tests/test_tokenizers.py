"""Foreign tokenizers: a Hugging Face tokenizer.json (checked against transformers' own tokenizer and
chat template), a SentencePiece model with Llama 2 ids, and a converted HF model whose special ids
(bos 300, eos 301, end of turn 304; no pad) run through SFT, GRPO and generation. Every tokenizer
and model is built here: nothing is downloaded."""

import json
import os
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jaxllm.app.cli import main
from jaxllm.data import chat, tasks
from jaxllm.data.pipeline import prompt_example, preference_example, sequence_example, tokenize_docs
from jaxllm.data.tokenizer import EOS_ID, HFTokenizer, SentencePieceTokenizer, Tokenizer
from jaxllm.errors import DataError
from jaxllm.app.inference import generate, load_model
from jaxllm.app import hf
from jaxllm.core.monitor import read_metrics
from jaxllm.objectives import make_trainer
from tests.conftest import stage_config

torch.set_num_threads(2)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOS, EOS, EOT = 300, 301, 304  # what the 300-token BPE below gives them
# Llama 3's template, with transformers' {% generation %} marks around what the assistant writes
TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
            "{% if message['role'] == 'assistant' %}"
            "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
            "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "reverse ab"},
        {"role": "assistant", "content": " ba "}]
TEXTS = ["Hello wörld 12+34=46\n\tsort 3 1 2 🙂", "reverse abc", " leading and trailing  ", "<|eot_id|> is one token"]


def write_hf_tokenizer(d: str, template: str = TEMPLATE, **config) -> str:
    """A byte-level BPE (300 tokens) + Llama-3-like specials, as tokenizer.json + tokenizer_config.json."""
    os.makedirs(d, exist_ok=True)
    texts = [f"{r['prompt']} {r['answer']}" for r in tasks.generate("mix", "train", 300)]
    tk = HFTok(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts + ["The quick brown fox jumps over the lazy dog."], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.add_special_tokens(SPECIALS)
    assert [tk.token_to_id(s) for s in SPECIALS] == [BOS, EOS, 302, 303, EOT]
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", BOS)])
    tk.save(os.path.join(d, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
           "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": False, "chat_template": template, **config}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return d


@pytest.fixture(scope="module")
def hf_tok_dir(tmp_path_factory):
    return write_hf_tokenizer(str(tmp_path_factory.mktemp("hf_tok")))


# ---- (a) tokenizer.json against transformers ---------------------------------------------------
def test_hf_tokenizer_matches_transformers(hf_tok_dir):
    ref = AutoTokenizer.from_pretrained(hf_tok_dir)
    tok = Tokenizer(hf_tok_dir)
    assert isinstance(tok, HFTokenizer) and Tokenizer(os.path.join(hf_tok_dir, "tokenizer.json")).sha256 == tok.sha256
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (ref.bos_token_id, ref.eos_token_id, (EOS,)) == (BOS, EOS, (EOS,))
    assert ref.pad_token_id is None and tok.pad_is_fallback and tok.pad_id == EOS  # documented fallback
    assert tok.vocab_size == len(ref) == 305 and tok.mask_id is None
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.encode(text, bos=True, eos=True) == ref.encode(text) + [EOS]  # its post-processor adds bos
        assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.encode_batch(TEXTS, bos=True) == [ref.encode(t) for t in TEXTS]
    assert tok.decode([BOS] + tok.encode("ab") + [EOS, EOS]) == "ab"  # bos, eos and pads are dropped


def test_hf_chat_template_text_ids_and_assistant_mask_match_transformers(hf_tok_dir):
    ref = AutoTokenizer.from_pretrained(hf_tok_dir)
    tok = Tokenizer(hf_tok_dir)
    assert tok.chat.text(CHAT) == ref.apply_chat_template(CHAT, tokenize=False)
    prompt = CHAT[:2]
    assert tok.chat.text(prompt, True) == ref.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids, mask = chat.render(tok, CHAT)
    # transformers computes its mask from the {% generation %} blocks; jaxllm from prefix renders
    want = ref.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids.tolist() == want["input_ids"] and mask.tolist() == want["assistant_masks"]
    assert tok.decode(ids[mask == 1]) == "4<|eot_id|>ba<|eot_id|>"
    assert ids[0] == BOS and EOS_ID not in ids[mask == 1]
    assert tok.chat.stop_ids == (EOT, EOS)  # the template's end of turn, then eos

    p = chat.prompt_ids(tok, "12+34=")
    assert p.tolist() == ref.apply_chat_template([{"role": "user", "content": "12+34="}], tokenize=True,
                                                 add_generation_prompt=True, return_dict=True)["input_ids"]
    # a preference pair masks only its completion, even after an earlier assistant turn in the prompt
    ex = preference_example({"prompt": CHAT[:4], "chosen": "ab", "rejected": "xy"}, tok, seq_len=80)
    assert [tok.decode(t[m == 1]) for t, m in zip(ex["targets"], ex["loss_mask"])] == ["ab<|eot_id|>", "xy<|eot_id|>"]
    # padding: the fallback pad id (= eos) fills the rest, and only the masks say what is real
    seq = sequence_example(ids, mask, 64, tok.pad_id)
    assert (seq["inputs"][len(ids):] == EOS).all() and seq["loss_mask"][len(ids) - 1:].sum() == 0
    pe = prompt_example({"prompt": "12+34=", "answer": "46"}, tok, 32)
    assert pe["prompt"][pe["prompt_mask"] == 1].tolist() == p.tolist() and (pe["prompt"][:32 - len(p)] == EOS).all()


def test_template_errors_are_one_line(tmp_path, hf_tok_dir, monkeypatch):
    strict = write_hf_tokenizer(str(tmp_path / "strict"), "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match="chat template of .*: roles must alternate$"):
        chat.render(Tokenizer(strict), CHAT)
    last_only = write_hf_tokenizer(str(tmp_path / "last"), "{{ messages[-1]['content'] }}")
    with pytest.raises(DataError, match="not prefix-stable.*assistant turn 2"):
        chat.render(Tokenizer(last_only), CHAT[:3])
    broken = write_hf_tokenizer(str(tmp_path / "broken"), "{% for m in messages %}")
    with pytest.raises(DataError, match="does not parse"):
        chat.render(Tokenizer(broken), CHAT)
    no_template = write_hf_tokenizer(str(tmp_path / "none"), "")
    with pytest.raises(DataError, match="has no chat format"):
        chat.prompt_ids(Tokenizer(no_template), "hi")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the `hf` extra were not installed
    with pytest.raises(DataError, match=r"pip install 'jaxllm\[hf\]'"):
        Tokenizer(hf_tok_dir)


# ---- (b) SentencePiece with Llama 2 ids -------------------------------------------------------
def test_sentencepiece_with_llama2_ids(tmp_path):
    path = str(tmp_path / "llama2.model")
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([f"{r['prompt']} {r['answer']}" for r in tasks.generate("mix", "train", 400)]),
            model_writer=f, vocab_size=100, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            hard_vocab_limit=False, minloglevel=2)
    tok = Tokenizer(path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.eos_ids) == (0, 1, 2, (2,))
    assert tok.pad_is_fallback and tok.pad_id == 2 and tok.mask_id is None and tok.specials == {}
    ids = tok.encode("reverse abc", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "reverse abc"
    docs = tokenize_docs([{"text": "sort 3 1 2"}, {"text": "12+34="}], tok, "records")
    assert all(d[0] == 1 and d[-1] == 2 for d in docs)
    with pytest.raises(DataError, match="no chat format"):  # no jaxllm chat tokens, no template
        chat.prompt_ids(tok, "hi")
    sha = tok.sha256
    os.rename(path, tmp_path / "tokenizer.model")  # a directory holding tokenizer.model works too
    assert Tokenizer(str(tmp_path)).sha256 == sha


# ---- (c) a converted HF model: SFT, GRPO and generate use its tokenizer --------------------------
A = 77  # a plain token; the model below writes 3 (jaxllm's EOS id, here an ordinary byte), A, then EOS


def _scripted_llama(d: str, vocab: int = 512, scripted: bool = True):
    """A tiny Llama whose greedy output is a function of the current token only: anything -> 3 -> A
    -> EOS (attention/MLP outputs zeroed, so the residual stream is the token's embedding)."""
    ids = dict(bos_token_id=BOS, eos_token_id=EOS) if scripted else {}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=None, tie_word_embeddings=False, **ids)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        if not scripted:
            model.save_pretrained(d)
            return model
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[3] = torch.nn.functional.one_hot(torch.tensor(1), 64).float()
        emb[A] = torch.nn.functional.one_hot(torch.tensor(2), 64).float()
        head.zero_()
        head[3, 0], head[A, 1], head[EOS, 2] = 8.0, 8.0, 8.0
    model.save_pretrained(d)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_tok_dir):
    """(HF dir, torch model, jaxllm run dir converted by the CLI)."""
    d = str(tmp_path_factory.mktemp("hf_model"))
    model = _scripted_llama(d)
    write_hf_tokenizer(d)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS, "eos_token_id": [EOS, EOT]}, f)
    out = str(tmp_path_factory.mktemp("conv") / "run")
    assert main(["convert", "hf-to-jaxllm", "--hf-dir", d, "--out", out]) == 0
    return d, model, out


def test_convert_records_the_hf_tokenizer_and_generate_stops_at_its_eos(converted):
    d, tmodel, out = converted
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(out))
    assert "tokenizer.model" not in os.listdir(out)
    model, tok, meta = load_model(out)
    assert tok.path == os.path.join(out, "tokenizer.json") and meta["tokenizer"]["path"] == tok.path
    assert meta["tokenizer"]["eos_ids"] == [EOS, EOT] and meta["tokenizer"]["pad_id"] == EOS
    assert hf.load_tokenizer(d).sha256 == tok.sha256

    prompt = tok.encode("12+34=", bos=True)
    with torch.no_grad():
        want = tmodel.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=8, do_sample=False, eos_token_id=[EOS, EOT], pad_token_id=EOS)
    assert want[0, len(prompt):].tolist() == [3, A, EOS]  # transformers stops at EOS too
    assert generate(model, tok, ["12+34="], max_new=8) == [tok.decode([3, A])]  # 3 is not a stop here

    # and back to HF: its config carries the tokenizer's ids, and transformers reads the tokenizer
    back = os.path.join(os.path.dirname(out), "back")
    assert main(["convert", "jaxllm-to-hf", "--ckpt", out, "--out", back]) == 0
    with open(os.path.join(back, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (BOS, [EOS, EOT], None)
    assert AutoTokenizer.from_pretrained(back).apply_chat_template(CHAT, tokenize=False) == tok.chat.text(CHAT)


@pytest.mark.slow
def test_sft_then_grpo_from_a_converted_model_use_its_template_and_ids(converted, tmp_path):
    _, _, out = converted
    common = [f"model={out}/model.yaml", f"data.tokenizer={out}", "checkpoint.every=0", "train.log_every=1"]
    sft = stage_config(tmp_path / "sft", "sft_tiny", *common, f"checkpoint.init_from={out}", "train.steps=3",
                       "train.batch_size=8", "eval.every=0", "objective.eval_generate=0", "data.eval_sources=[]",
                       "data.eval_fraction=0", "data.packing=none")
    trainer = make_trainer(sft)
    tok = trainer.stage.tokenizer
    batch = next(trainer.stage.pipeline.iterator())
    answers = {r["answer"] for r in tasks.generate("mix", "train")}
    for targets, m, inputs in zip(batch["targets"], batch["loss_mask"], batch["inputs"]):
        learned = targets[m == 1]  # the model's own template, assistant turn only, ending at its EOT
        assert learned[-1] == EOT and tok.decode(learned) in answers  # (decode drops eos ids: EOT is one)
        assert inputs[0] == BOS and EOT in inputs
    result = trainer.run()
    assert result["step"] == 3 and np.isfinite(result["loss"])

    grpo = stage_config(tmp_path / "grpo", "grpo_tiny", *common, f"checkpoint.init_from={sft.output_dir}",
                        "train.steps=2", "train.batch_size=8", "rl.group_size=4", "rl.minibatches=1",
                        "rl.max_new_tokens=6", "rl.eval_prompts=8", "eval.every=0")  # final eval: rollout shapes
    make_trainer(grpo).run()
    metrics = read_metrics(grpo.output_dir)
    rollouts = [m for m in metrics if "reward_mean" in m]
    assert len(rollouts) == 2
    # every completion is [3, A, EOS]: stopped at the tokenizer's EOS (301), not at jaxllm's 3
    assert all(r["finished_fraction"] == 1.0 and r["response_length"] == 3.0 for r in rollouts), rollouts
    assert any("eval_reward" in m for m in metrics)


# ---- (d) a tokenizer larger than the model --------------------------------------------------------
def test_tokenizer_larger_than_model_vocab_is_a_clear_error(tmp_path, hf_tok_dir, capsys):
    d = str(tmp_path / "small")
    _scripted_llama(d, vocab=256, scripted=False)
    write_hf_tokenizer(d)
    with pytest.raises(DataError, match="has 305 tokens but the model's vocab_size is 256"):
        hf.load_tokenizer(d, vocab_size=256)
    capsys.readouterr()
    assert main(["convert", "hf-to-jaxllm", "--hf-dir", d, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "305" in err and "256" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "never")
