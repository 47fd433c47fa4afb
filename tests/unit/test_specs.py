import json

import pytest

from planner.presets import CLUSTERS, MODELS
from planner.specs import ModelSpec, SpecError, load_cluster, load_model


def test_llama3_presets_match_published_parameter_counts():
    # Llama 3 paper (arXiv 2407.21783) Table 3: 8B, 70B, 405B
    assert MODELS["llama3-8b"].total_params == pytest.approx(8.03e9, rel=0.01)
    assert MODELS["llama3-70b"].total_params == pytest.approx(70.6e9, rel=0.01)
    assert MODELS["llama3-405b"].total_params == pytest.approx(405.9e9, rel=0.01)


def test_gpt3_175b_parameter_count():
    assert MODELS["gpt3-175b"].total_params == pytest.approx(175e9, rel=0.01)


def test_hf_gpt2_config(tmp_path):
    cfg = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257, "n_inner": None,
           "model_type": "gpt2"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = load_model(str(path))
    assert (spec.flavour, spec.num_layers, spec.hidden_size, spec.ffn, spec.seq_len) == ("gpt2", 12, 768, 3072, 1024)
    assert spec.tie_embeddings  # GPT-2 ties by default
    assert spec.total_params == pytest.approx(124.4e6, rel=0.01)  # GPT-2 small


def test_hf_llama_config_and_seq_len_override(tmp_path):
    cfg = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192,
           "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = load_model(str(path), seq_len=4096)
    assert spec.kv_heads == 8 and spec.seq_len == 4096
    assert spec.total_params == MODELS["llama3-8b"].total_params


def test_own_yaml_model_rejects_unknown_keys(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("name: x\nflavour: gpt2\nnum_layers: 2\nhidden_size: 64\nnum_heads: 4\nvocab_size: 256\n"
                    "seq_len: 32\nnum_layayers: 3\n")
    with pytest.raises(SpecError, match="num_layayers: unknown key"):
        load_model(str(path))


def test_bad_shapes_are_one_line_errors(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"name": "x", "flavour": "gpt2", "num_layers": 2, "hidden_size": 65, "num_heads": 4,
                                "vocab_size": 256, "seq_len": 32}))
    with pytest.raises(SpecError) as e:
        load_model(str(path))
    assert "\n" not in str(e.value) and "not divisible by num_heads" in str(e.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(SpecError, match="no such preset.*gpt3-175b"):
        load_model("gpt5")


def test_cluster_gpus_must_fill_nodes():
    assert load_cluster("dgx-a100", 4).num_nodes == 1  # a partial node is allowed
    assert load_cluster("dgx-a100", 64).num_nodes == 8
    with pytest.raises(SpecError, match="not a multiple of gpus_per_node 8"):
        load_cluster("dgx-a100", 12)


def test_cluster_file_with_gpu_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gpu: h100-sxm\ngpus_per_node: 4\nintra_node: {bandwidth_GBps: 450, latency_us: 3}\n"
                    "inter_node: {nics_per_node: 4, nic_Gbps: 400, latency_us: 5, oversubscription: 2}\n")
    c = load_cluster(str(path), 16)
    assert c.gpu.peak_tflops == 989 and c.num_nodes == 4 and c.inter_node.oversubscription == 2


def test_presets_are_valid_specs():
    for m in MODELS.values():
        ModelSpec.model_validate(m.model_dump())
    assert set(CLUSTERS) >= {"dgx-a100", "dgx-h100", "local"}
