"""The README's Python example runs as written against a real server."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

README = Path(__file__).resolve().parents[2] / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_example_runs_as_written(
    server, fmnist, tmp_path: Path, capsys, monkeypatch
) -> None:
    (example,) = [b for b in code_blocks("python") if "InferenceStub" in b]
    (tmp_path / "samples").mkdir()
    Image.fromarray(fmnist.test_images[0]).save(tmp_path / "samples" / "00000-ankle-boot.png")
    monkeypatch.chdir(tmp_path)
    assert "127.0.0.1:8001" in example
    exec(compile(example.replace("127.0.0.1:8001", server.address), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[('") and lines[1] == "features.c1 (6, 28, 28)"


def test_grpcurl_examples_resolve_through_reflection(server) -> None:
    """What grpcurl does for each README line: find the method by reflection, send the JSON body.

    grpcurl itself is not packaged here, so the test walks the same path with grpc's reflection
    client: the service and message types come from the server, not from our proto files.
    """
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    (block,) = [b for b in code_blocks("sh") if "grpcurl" in b]
    database = ProtoReflectionDescriptorDatabase(server.channel)
    pool = descriptor_pool.DescriptorPool(database)
    calls = 0
    for line in block.splitlines():
        words = line.split()
        if not words or words[0] != "grpcurl" or words[-1] == "list":
            if words and words[-1] == "list":
                assert {"cnnserve.v1.Inference", "grpc.health.v1.Health"} <= set(
                    database.get_services()
                )
            continue
        body = re.search(r"-d '([^']*)'", line)
        service_name, method_name = words[-1].rsplit("/", 1)
        method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
        request_class = message_factory.GetMessageClass(method.input_type)
        reply_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(body.group(1) if body else "{}", request_class())
        call = server.channel.unary_unary(
            f"/{service_name}/{method_name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply_class.FromString,
        )
        reply = json_format.MessageToDict(call(request, timeout=10))
        assert reply, line
        calls += 1
    assert calls == 2
