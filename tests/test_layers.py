"""The package's rooms (a folder such as train/, or a top-level module such as runtime.py) stack in layers:
an import only ever goes down. Seen from the rooms, any cycle means some import runs back up a layer,
even when no module-level cycle exists (e.g. models/encdec.py once imported infer/sampling.py while
infer/ imports models/)."""

from test_import_graph import PACKAGE, cycles, import_graph


def room(module: str) -> str:
    """llmkit.train.loop -> llmkit.train; llmkit.runtime -> llmkit.runtime."""
    return ".".join(module.split(".")[:2])


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for module, imported in graph.items():
        if module == PACKAGE:
            continue
        rooms.setdefault(room(module), set()).update(room(m) for m in imported if m != PACKAGE)
    return {r: deps - {r} for r, deps in rooms.items()}


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """Rooms from the bottom layer up: each room's layer is one above the highest room it imports."""
    level: dict[str, int] = {}

    def height(r: str) -> int:
        if r not in level:
            level[r] = 1 + max((height(d) for d in graph.get(r, ())), default=-1)
        return level[r]

    for r in graph:
        height(r)
    return [sorted(r for r in level if level[r] == n) for n in range(max(level.values()) + 1)]


def test_rooms_only_import_downwards():
    assert cycles(room_graph(import_graph())) == []


def test_a_room_that_imports_back_up_is_caught():
    graph = {"llmkit.models.encdec": {"llmkit.infer.sampling"}, "llmkit.infer.engine": {"llmkit.models.decoder"},
             "llmkit.infer.sampling": set(), "llmkit.models.decoder": set()}
    assert cycles(graph) == []  # no module-level cycle...
    assert cycles(room_graph(graph)) == [["llmkit.infer", "llmkit.models"]]  # ...but the rooms go round


def test_the_foundations_import_no_other_room():
    """What training and inference both stand on: device and precision, sampling, configs, tokenizers."""
    bottom = layers(room_graph(import_graph()))[0]
    assert {"llmkit.runtime", "llmkit.sampling", "llmkit.config", "llmkit.tokenizer"} <= set(bottom)


if __name__ == "__main__":
    for n, rooms in enumerate(layers(room_graph(import_graph()))):
        print(n, " ".join(r.removeprefix(PACKAGE + ".") for r in rooms))
