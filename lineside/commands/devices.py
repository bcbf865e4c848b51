"""`lineside devices`: target box profiles and the host probe."""

from __future__ import annotations

import json

import click


@click.group()
def devices():
    """Target box profiles, and what this box is.

    \b
    Examples:
      lineside devices probe                 # this box: CPU, devices, matching profile
      lineside devices list
      lineside run bundle --source 0 --profile intel-n100
    """


@devices.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def devices_list(as_json):
    """The shipped target box profiles and the runtime settings each applies."""
    from lineside.devices.profiles import shipped_profiles

    profiles = shipped_profiles()
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    for p in profiles:
        rt = ", ".join(f"{k} {v}" for k, v in p.runtime.items())
        click.echo(f"{p.name:22s} {p.title}\n{'':22s} -> {rt}")


@devices.command("show")
@click.argument("profile")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def devices_show(profile, as_json):
    """Everything a PROFILE (a name, or a .yaml file) says."""
    from lineside.devices.profiles import get_profile

    p = get_profile(profile, what="PROFILE")
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    click.echo(f"{p.name}: {p.title}")
    if p.cpu:
        click.echo("cpu: " + ", ".join(f"{k} {v}" for k, v in p.cpu.items()))
    if p.memory_gb:
        click.echo(f"memory: {p.memory_gb:g} GB")
    for a in p.accelerators:
        click.echo(f"accelerator: {a['device']}" + (f" ({a['what']})" if a.get("what") else ""))
    click.echo("runtime settings: " + (", ".join(f"--{k} {v}" for k, v in p.runtime.items()) or "none"))
    if p.notes:
        click.echo(p.notes)


@devices.command("probe")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def devices_probe(as_json):
    """What this box is: CPU and its INT8 instructions, memory, the devices OpenVINO and
    ONNX Runtime see, the shipped profiles that match, and the settings to start from.
    Check them with `lineside bench BUNDLE --profile NAME`."""
    from lineside.devices.probe import matching_profiles, probe_host, recommend

    from lineside.devices.profiles import shipped_profiles

    host, profiles = probe_host(), shipped_profiles()
    host["matching_profiles"] = [p.name for p in matching_profiles(host, profiles)]
    host["recommended"] = recommend(host, profiles)
    if as_json:
        click.echo(json.dumps(host, indent=2))
        return
    click.echo(f"cpu: {host['cpu_model']} ({host['arch']}, {host['cores']} cores), memory "
               f"{host['memory_gb']} GB" + (f", board {host['board']}" if host["board"] else ""))
    click.echo("int8 dot-product instructions: " + (", ".join(host["int8_dot_product"]) or "none"))
    ov = host.get("openvino") or {}
    if "devices" in ov:
        click.echo(f"openvino {ov['version']}: " + ", ".join(f"{d} ({n})" for d, n in ov["devices"].items()))
    else:
        click.echo(f"openvino: not usable ({ov.get('error')})")
    ort = host.get("onnxruntime") or {}
    click.echo(f"onnxruntime {ort['version']}: " + ", ".join(ort["providers"]) if "providers" in ort
               else f"onnxruntime: not usable ({ort.get('error')})")
    rec = host["recommended"]
    click.echo(f"matching profiles: {', '.join(host['matching_profiles']) or 'none'}")
    click.echo(f"start with: {' '.join(f'--{k} {v}' for k, v in rec['runtime'].items())}  ({rec['why']})")
