"""The webhook delivery task: one attempt per run, retried by Celery after an exponentially growing delay until it
succeeds or used MCS_WEBHOOK_MAX_ATTEMPTS; every attempt is recorded in the delivery log."""

from celery import Task

from core.service.settings import get_settings
from core.service.webhooks import deliver
from worker.celery_app import DELIVER_WEBHOOK_TASK, app


@app.task(name=DELIVER_WEBHOOK_TASK, bind=True, max_retries=None)
def deliver_webhook(self: Task, delivery_id: str) -> None:
    delay = deliver(delivery_id, get_settings())
    if delay is not None:
        raise self.retry(countdown=delay)
