"""`avr serve`: an HTTP service over a trained run, thin over the library's own search
(``avr.evaluate.search.Searcher``), and the single web page it serves (``page.html``: plain HTML
and JavaScript, no build step). ``avr.serve.app`` holds the routes; starlette and uvicorn come
with the ``serve`` extra."""
