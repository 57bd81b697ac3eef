"""The jobs' queue on RabbitMQ: a quorum queue unless `AVATARQ_RABBITMQ_QUEUE_TYPE=classic`,
with countdowns waiting in the broker's delay queues; a Redis broker's configuration is not
touched by either."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from amqp.exceptions import PreconditionFailed
from celery import Celery, Task
from celery.contrib.testing.worker import start_worker
from celery.utils.quorum_queues import detect_quorum_queues
from kombu import Connection, Exchange, Queue

from avatarq.celeryconfig import (
    BROKER_HEALTH_CHECK_S,
    QUORUM_DELIVERY_LIMIT,
    QUORUM_EXCHANGE,
    RENDER_QUEUE,
    RENDER_TASK,
    broker_countdown,
    celery_config,
    check_queue_type,
)
from avatarq.redisclient import TIMEOUTS
from avatarq.settings import Settings
from producers.client import celery_app

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_URL = "redis://127.0.0.1:6379/0"


def app_for(**env: str) -> Celery:
    app = Celery("avatarq-test", set_as_current=False)
    app.config_from_object(celery_config(Settings(**env)))  # type: ignore[arg-type]
    return app


def test_an_amqp_broker_gets_a_quorum_queue_by_default() -> None:
    # The producers' app, which is built from the configuration's JSON.
    app = celery_app(Settings(REDIS_URL=REDIS_URL, CELERY_BROKER_URL=AMQP_URL))
    queue = app.amqp.queues[RENDER_QUEUE]
    assert queue.queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
    }
    # Native delayed delivery needs a topic exchange; Celery then drops global QoS too.
    assert (queue.exchange.name, queue.exchange.type) == (QUORUM_EXCHANGE, "topic")
    assert detect_quorum_queues(app, "amqp") == (True, RENDER_QUEUE)
    # The render task is routed to it by name, as producers send it.
    assert app.amqp.router.route({}, RENDER_TASK)["queue"] is queue


def test_classic_by_setting_is_celerys_default_queue() -> None:
    app = app_for(
        REDIS_URL=REDIS_URL, CELERY_BROKER_URL=AMQP_URL, AVATARQ_RABBITMQ_QUEUE_TYPE="classic"
    )
    assert "task_queues" not in app.conf.table()
    queue = app.amqp.queues[RENDER_QUEUE]
    assert not queue.queue_arguments
    assert (queue.exchange.name, queue.exchange.type) == (RENDER_QUEUE, "direct")


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_a_redis_broker_is_configured_as_a_classic_rabbitmq_one(queue_type: str) -> None:
    classic = Settings(
        REDIS_URL=REDIS_URL, CELERY_BROKER_URL=AMQP_URL, AVATARQ_RABBITMQ_QUEUE_TYPE="classic"
    )
    redis = Settings(REDIS_URL=REDIS_URL, AVATARQ_RABBITMQ_QUEUE_TYPE=queue_type)
    as_classic = celery_config(classic)
    # Only the broker's URL differs, and the timeouts and checks of its Redis connections.
    transport = {
        **as_classic["broker_transport_options"],
        **TIMEOUTS,
        "health_check_interval": BROKER_HEALTH_CHECK_S,
    }
    expected = {**as_classic, "broker_url": REDIS_URL, "broker_transport_options": transport}
    assert celery_config(redis) == expected


@pytest.mark.parametrize(("seconds", "whole"), [(0.0, 0), (0.3, 1), (1.0, 1), (2.01, 3)])
def test_countdowns_go_to_the_broker_in_whole_seconds(seconds: float, whole: int) -> None:
    assert broker_countdown(seconds) == whole


@pytest.fixture
def quorum_app(rabbitmq_server: str, redis_server: str) -> Iterator[Celery]:
    app = app_for(REDIS_URL=redis_server, CELERY_BROKER_URL=rabbitmq_server)
    yield app
    with Connection(rabbitmq_server) as conn:
        Queue(RENDER_QUEUE).bind(conn.default_channel).delete()


@pytest.mark.slow
def test_the_queue_is_a_quorum_queue_and_countdowns_come_back_through_the_broker(
    quorum_app: Celery, rabbitmq_server: str
) -> None:
    deliveries: list[tuple[float, dict[str, Any]]] = []
    done = threading.Event()

    @quorum_app.task(name=RENDER_TASK, bind=True, max_retries=None)
    def render(self: Task) -> None:
        deliveries.append((time.monotonic(), dict(self.request.delivery_info)))
        if len(deliveries) == 1:
            # Under a second: rounded up, as the render task sends its retries.
            raise self.retry(countdown=broker_countdown(0.4))
        done.set()

    with start_worker(quorum_app, pool="threads", perform_ping_check=False):
        sent_at = time.monotonic()
        quorum_app.send_task(RENDER_TASK, queue=RENDER_QUEUE, countdown=2)
        assert done.wait(60), deliveries
    (first, _), (second, _) = deliveries
    # The producer's countdown and the retry's each waited in the broker's delay queues
    # (the routing key carries the delay's bits), not in the worker.
    assert first - sent_at >= 1.5 and second - first >= 0.5, deliveries
    for _, info in deliveries:
        assert info["routing_key"].endswith(f".{RENDER_QUEUE}"), deliveries
    with Connection(rabbitmq_server) as conn:
        channel = conn.default_channel
        Exchange("celery_delayed_27", "topic", passive=True).bind(channel).declare()
        # A queue of another type under its name is refused: it is a quorum queue.
        classic = Queue(RENDER_QUEUE, queue_arguments={"x-queue-type": "classic"})
        with pytest.raises(PreconditionFailed, match="current is 'quorum'"):
            classic.bind(channel).declare()


@pytest.mark.slow
def test_a_worker_stops_at_start_on_a_broker_that_has_the_classic_queue(
    quorum_app: Celery, rabbitmq_server: str
) -> None:
    check_queue_type(quorum_app)  # a fresh broker: nothing in the way
    with Connection(rabbitmq_server) as conn:
        Queue(RENDER_QUEUE).bind(conn.default_channel).delete()
        classic = Queue(RENDER_QUEUE, Exchange(RENDER_QUEUE, "direct"), RENDER_QUEUE)
        classic.bind(conn.default_channel).declare()
    with pytest.raises(SystemExit, match="AVATARQ_RABBITMQ_QUEUE_TYPE=quorum does: set") as stop:
        check_queue_type(quorum_app)
    assert "inequivalent arg 'x-queue-type' for queue 'avatarq'" in str(stop.value)
