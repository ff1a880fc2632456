"""Print a line of a suite's own figures at the end of a module, past pytest's capture."""


def print_past_capture(request, line: str) -> None:
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
    else:
        with capture.global_and_fixture_disabled():
            print("\n" + line)
