"""The HTTP/WebSocket server (`omnivox serve`) and its load tester (`omnivox loadtest`).

protocol.py  wire types (OpenAI shapes) and the one exception -> status table
app.py       build_app(engine or factory, ServerConfig) and serve(...)
routes.py    thin handlers
serving.py   SpeechService: engine lifetime, request checks, request -> engine stream
stream.py    the engine thread, ManagedStream, SSE / raw audio bodies, disconnect -> cancel
websocket.py the /v1/stream conversation
metrics.py   Prometheus metrics, one registry per app
loadtest.py  run_loadtest(...) and loadtest_main(args)
static/      the demo page
"""
