"""ClientApp: one contributor (or held-out evaluator) holding one task.

* ``query``: tell the server which task this node holds (and its role, if the node config says).
* ``train``: load the received body, attach this task's own head, finetune, reply with the body only.
* ``evaluate``: the scores of the received body on this task in the views the server asks for.

Each handler reads the message, calls ``app.site.contributor`` and replies.

Site settings in the node config (deployment): ``task=...`` / ``data-dir=...`` (which task), ``state-dir=/abs/path``
keeps this site's heads and its log of contributions on disk (``app.site.state``; otherwise heads live in
``context.state``, which lasts one run), ``device=cpu|cuda|cuda:N`` overrides the server's ``client.device``,
``site=NAME`` names the site (two sites holding the same task are ordered by it), ``allow-faults=true`` lets
the testing aid ``app.site.faults`` act on this node (never on a real site).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from app.site.contributor import answer_query, contribute, score_body
from app.site.faults import malformed_content
from strategies.transport import to_state_dict

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    answer = answer_query(context.node_config, msg.content["config"])
    return Message(content=RecordDict({"task": ConfigRecord(answer)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    done = contribute(config, to_state_dict(msg.content["arrays"]), context.node_config, context.state,
                      int(context.run_id))
    metrics = MetricRecord(done.metrics)
    if done.fault == "malformed":  # testing aid: a reply whose records are wrong
        content = malformed_content(int(config["server-round"]), done.body, metrics)
    else:
        content = RecordDict({"arrays": ArrayRecord(done.body), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    scores = score_body(msg.content["config"], to_state_dict(msg.content["arrays"]), context.node_config)
    return Message(content=RecordDict({"metrics": MetricRecord(scores)}), reply_to=msg)
