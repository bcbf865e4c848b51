"""Target box profiles, the host probe, and --profile on the runtime commands."""

import json

import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.devices.probe import cpu_facts, matching_profiles, probe_host, recommend
from lineside.devices.profiles import get_profile, load_profile, resolve_runtime, shipped_profiles
from lineside.errors import LinesideError

N100_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) N100
flags\t\t: fpu sse4_2 avx avx2 fma avx_vnni sha_ni
"""


def test_shipped_profiles_load_and_are_distinct():
    profiles = shipped_profiles()
    names = [p.name for p in profiles]
    assert len(names) >= 5 and len(set(names)) == len(names)
    for p in profiles:
        assert p.match, f"{p.name} has no match rules"
        assert p.runtime.get("precision") in ("fp32", "int8")
        assert p.title and p.notes


@pytest.mark.parametrize("host, expected", [
    ({"arch": "x86_64", "cpu_model": "Intel(R) N100", "cpu_features": ["avx2", "avx_vnni"]}, "intel-n100"),
    ({"arch": "x86_64", "cpu_model": "Intel(R) Core(TM) Ultra 7 155H", "cpu_features": ["avx2", "avx_vnni"]},
     "intel-core-ultra"),
    ({"arch": "x86_64", "cpu_model": "AMD EPYC", "cpu_features": ["avx2", "avx512f", "avx512_vnni"]},
     "x86-64-avx512-vnni"),
    ({"arch": "x86_64", "cpu_model": "Intel(R) Core(TM) i5-8500", "cpu_features": ["avx2", "fma"]}, "x86-64-avx2"),
    ({"arch": "aarch64", "cpu_model": "", "board": "Raspberry Pi 5 Model B Rev 1.0",
      "cpu_features": ["asimd", "asimddp"]}, "raspberry-pi-5"),
    ({"arch": "aarch64", "cpu_model": "", "board": "Raspberry Pi 4 Model B Rev 1.4", "cpu_features": ["asimd"]},
     "raspberry-pi-4"),
])
def test_probe_matches_the_most_specific_profile(host, expected):
    found = matching_profiles(host)
    assert found and found[0].name == expected
    rec = recommend(host)
    assert rec["profile"] == expected and rec["runtime"] == found[0].runtime


def test_vnni_host_is_not_called_an_avx2_only_box():
    host = {"arch": "x86_64", "cpu_model": "AMD EPYC", "cpu_features": ["avx2", "avx512_vnni"]}
    assert "x86-64-avx2" not in [p.name for p in matching_profiles(host)]


def test_unknown_host_gets_a_rule_of_thumb():
    riscv = {"arch": "riscv64", "cpu_model": "SiFive", "cpu_features": [], "int8_dot_product": [],
             "openvino": {"error": "ImportError"}}
    rec = recommend(riscv)
    assert rec["profile"] is None
    assert rec["runtime"] == {"backend": "onnxruntime", "device": "CPU", "precision": "fp32"}
    vnni = dict(riscv, arch="x86_64", int8_dot_product=["AVX-512 VNNI"], openvino={"devices": {"CPU": "x"}})
    assert recommend(vnni, profiles=[])["runtime"]["precision"] == "int8"


def test_cpu_facts_reads_model_and_int8_flags():
    facts = cpu_facts(N100_CPUINFO)
    assert facts["cpu_model"] == "Intel(R) N100"
    assert "avx_vnni" in facts["cpu_features"] and "sha_ni" not in facts["cpu_features"]
    host = probe_host(N100_CPUINFO, with_devices=False)
    assert host["int8_dot_product"] == ["AVX-VNNI"]


def test_probe_of_this_host_is_complete():
    host = probe_host()
    assert host["cores"] >= 1 and host["arch"]
    assert "CPU" in host["openvino"]["devices"]
    assert "CPUExecutionProvider" in host["onnxruntime"]["providers"]


@pytest.mark.parametrize("text, fault", [
    ("name: x\nruntime: {precision: int4}\n", "runtime.precision"),
    ("name: x\nspeed: fast\n", "unknown key(s) speed"),
    ("name: x\nruntime: {threads: -2}\n", "runtime.threads"),
    ("name: x\nmatch: {arch: [x86_64], cores: 4}\n", "match must be"),
    ("- just\n- a list\n", "YAML mapping"),
    ("name: [x\n", "not valid YAML"),
    ("name: 'a b'\n", "name must be"),
])
def test_bad_profile_names_file_and_key(tmp_path, text, fault):
    path = tmp_path / "box.yaml"
    path.write_text(text)
    with pytest.raises(LinesideError) as err:
        load_profile(path)
    assert str(path) in str(err.value) and fault in str(err.value)


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(LinesideError, match="raspberry-pi-5"):
        get_profile("jetson-thor")


def test_command_line_beats_profile_beats_default(tmp_path):
    path = tmp_path / "box.yaml"
    path.write_text("name: box\nruntime: {backend: onnxruntime, precision: int8, threads: 3}\n")
    prof = load_profile(path)
    r = resolve_runtime(prof, backend=None, precision="fp32", device=None, threads=None, hint=None)
    assert r == {"backend": "onnxruntime", "device": "CPU", "precision": "fp32", "threads": 3, "hint": "auto"}
    assert resolve_runtime(None)["backend"] == "auto"


def test_profile_option_picks_the_backend(tiny_bundle, synth_test_dir, tmp_path):
    bundle, _ = tiny_bundle
    box = tmp_path / "box.yaml"
    box.write_text("name: box\nruntime: {backend: onnxruntime, threads: 1}\n")
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(bundle), str(synth_test_dir), "--profile", str(box), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["backend"] == "onnxruntime"
    res = runner.invoke(main, ["eval", str(bundle), str(synth_test_dir), "--profile", str(box),
                               "--backend", "openvino", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["backend"] == "openvino"
    res = runner.invoke(main, ["eval", str(bundle), str(synth_test_dir), "--profile", "no-such-box"])
    assert res.exit_code == 2 and "no profile named 'no-such-box'" in res.output


def test_missing_openvino_device_is_named(tiny_bundle):
    from lineside.runtime.model import open_model

    bundle, _ = tiny_bundle
    with pytest.raises(LinesideError, match="--device NPU7: OpenVINO sees no such device"):
        open_model(bundle, device="NPU7")


def test_devices_commands():
    runner = CliRunner()
    res = runner.invoke(main, ["devices", "probe", "--json"])
    assert res.exit_code == 0, res.output
    host = json.loads(res.output)
    assert host["recommended"]["runtime"]["backend"] in ("openvino", "onnxruntime")
    res = runner.invoke(main, ["devices", "list", "--json"])
    assert {p["name"] for p in json.loads(res.output)} == {p.name for p in shipped_profiles()}
    res = runner.invoke(main, ["devices", "show", "raspberry-pi-5"])
    assert res.exit_code == 0 and "--backend onnxruntime" in res.output


def test_profile_auto_uses_what_the_probe_finds(tiny_bundle, synth_test_dir):
    from lineside.devices.probe import auto_profile, recommend

    expected = recommend(probe_host())["runtime"]
    assert auto_profile().runtime == expected
    bundle, _ = tiny_bundle
    res = CliRunner().invoke(main, ["eval", str(bundle), str(synth_test_dir), "--profile", "auto",
                                    "--precision", "fp32", "--json"])
    assert res.exit_code == 0, res.output
    assert "--profile auto:" in res.output   # says which it took (CliRunner mixes stderr in)
    want = {"auto": "openvino"}.get(expected.get("backend", "auto"), expected.get("backend", "auto"))
    assert json.loads(res.output[res.output.index("{"):])["backend"] == want


def test_profile_int8_yields_to_fp32_when_the_bundle_has_none(tiny_bundle, synth_test_dir, tmp_path):
    import shutil

    bundle = tmp_path / "fp32-only"
    shutil.copytree(tiny_bundle[0], bundle)
    doc = json.loads((bundle / "bundle.json").read_text())
    doc["models"] = {k: v for k, v in doc["models"].items() if not k.endswith("_int8")}
    (bundle / "bundle.json").write_text(json.dumps(doc))
    box = tmp_path / "box.yaml"
    box.write_text("name: box\nruntime: {backend: onnxruntime, precision: int8}\n")
    res = CliRunner().invoke(main, ["eval", str(bundle), str(synth_test_dir), "--profile", str(box), "--json"])
    assert res.exit_code == 0, res.output
    assert "no INT8 model" in res.output
    res = CliRunner().invoke(main, ["eval", str(bundle), str(synth_test_dir), "--precision", "int8"])
    assert res.exit_code == 2 and "no int8 model" in res.output   # asked for on the command line: refused
