//! The lifecycle of one instance: start (spawn, wait for SERVING, or fail with the reason),
//! exit (crash reports and restarts with backoff), and stop (drain, SIGTERM, SIGKILL).

use super::*;

impl Supervisor {
    pub fn start<'a>(
        &'a self,
        id: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Instance, ControlError>> + Send + 'a>,
    > {
        Box::pin(self.start_inner(id))
    }

    pub(super) async fn start_inner(&self, id: &str) -> Result<Instance, ControlError> {
        let (listen, generation) = {
            let mut slots = self.inner.slots.lock().await;
            let Some(slot) = slots.get_mut(id) else {
                drop(slots);
                return Err(self.not_found(id).await);
            };
            match slot.state {
                InstanceState::Serving | InstanceState::Starting => {
                    return Ok(self.snapshot_of(slot));
                }
                InstanceState::Draining => {
                    return Err(ControlError::Busy {
                        id: id.to_owned(),
                        state: "draining",
                        hint: "wait until it has stopped, then start it again",
                    });
                }
                _ => {}
            }
            slot.state = InstanceState::Starting;
            slot.stopping = false;
            slot.generation += 1;
            slot.last_error.clear();
            let out = (slot.listen.clone(), slot.generation);
            self.publish(&slots).await;
            out
        };
        let spawned = tokio::time::timeout(
            self.inner.start_timeout,
            process::spawn(
                &self.inner.bin,
                id,
                &listen,
                &self.inner.redis,
                &self.inner.instance_args,
            ),
        )
        .await
        .unwrap_or_else(|_| {
            // Dropping the spawn future kills the child (kill_on_drop).
            Err(process::SpawnError::Exited {
                stderr: format!("no address reported within {:?}", self.inner.start_timeout),
            })
        });
        let spawned = match spawned {
            Ok(spawned) => spawned,
            Err(error) => {
                let reason = error.to_string();
                self.fail_start(id, generation, &reason).await;
                return Err(ControlError::StartFailed {
                    id: id.to_owned(),
                    reason,
                });
            }
        };
        {
            let mut slots = self.inner.slots.lock().await;
            match slots.get_mut(id) {
                Some(slot) if slot.generation == generation && !slot.stopping => {
                    slot.pid = spawned.pid;
                    slot.listen = spawned.addr.clone();
                }
                // Stopped or removed while the process was being spawned: it must not run.
                _ => {
                    drop(slots);
                    let mut child = spawned.child;
                    let _ = child.kill().await;
                    return Err(ControlError::StartFailed {
                        id: id.to_owned(),
                        reason: "stopped while starting".to_owned(),
                    });
                }
            }
            self.publish(&slots).await;
        }
        let addr = spawned.addr.clone();
        let stderr = spawned.stderr.clone();
        let this = self.clone();
        let id_owned = id.to_owned();
        let mut child = spawned.child;
        self.inner.tracker.spawn(async move {
            let status = child.wait().await;
            this.exited(&id_owned, generation, status, &stderr).await;
        });

        match tokio::time::timeout(
            self.inner.start_timeout,
            self.wait_serving(id, generation, &addr),
        )
        .await
        {
            Ok(true) => {}
            _ => {
                let reason = format!(
                    "no SERVING health within {:?} at {addr}",
                    self.inner.start_timeout
                );
                self.fail_start(id, generation, &reason).await;
                return Err(ControlError::StartFailed {
                    id: id.to_owned(),
                    reason,
                });
            }
        }
        let mut slots = self.inner.slots.lock().await;
        let Some(slot) = slots.get_mut(id) else {
            return Err(ControlError::StartFailed {
                id: id.to_owned(),
                reason: "removed while starting".to_owned(),
            });
        };
        if slot.generation != generation || slot.state != InstanceState::Starting {
            let reason = if slot.last_error.is_empty() {
                format!("it is {} now", state_name(slot.state))
            } else {
                slot.last_error.clone()
            };
            return Err(ControlError::StartFailed {
                id: id.to_owned(),
                reason,
            });
        }
        slot.state = InstanceState::Serving;
        slot.serving_since = Some(Instant::now());
        let snapshot = self.snapshot_of(slot);
        self.publish(&slots).await;
        drop(slots);
        tracing::info!(instance = id, addr = %addr, "instance started");
        self.inner
            .events
            .lifecycle("started", &[("instance", id), ("addr", &addr)]);
        Ok(snapshot)
    }

    /// Polls health until SERVING; false once this start is no longer current (the process
    /// exited, or it was stopped or removed).
    pub(super) async fn wait_serving(&self, id: &str, generation: u64, addr: &str) -> bool {
        let addr = &dialable(addr);
        let Ok(endpoint) = dlb::dial::endpoint_tls(addr, self.inner.tls.as_ref()) else {
            return false;
        };
        let channel = endpoint.connect_lazy();
        let mut client = HealthClient::new(channel);
        loop {
            let request = HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(Ok(reply)) =
                tokio::time::timeout(Duration::from_secs(1), client.check(request)).await
                && reply.into_inner().status() == ServingStatus::Serving
            {
                return true;
            }
            let current = self.inner.slots.lock().await.get(id).is_some_and(|slot| {
                slot.generation == generation
                    && slot.state == InstanceState::Starting
                    && !slot.stopping
            });
            if !current {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub(super) async fn fail_start(&self, id: &str, generation: u64, reason: &str) {
        let pid = {
            let mut slots = self.inner.slots.lock().await;
            let Some(slot) = slots.get_mut(id) else {
                return;
            };
            if slot.generation != generation {
                return;
            }
            slot.state = InstanceState::Crashed;
            slot.stopping = true; // its exit, if it is still running, is expected now
            slot.last_error = reason.to_owned();
            let pid = slot.pid;
            self.publish(&slots).await;
            pid
        };
        if pid != 0 {
            process::signal(pid, true);
        }
        tracing::warn!(instance = id, reason, "instance did not start");
        self.inner
            .events
            .error("start failed", &[("instance", id), ("reason", reason)]);
    }

    /// The waiter's verdict on an exit.
    pub(super) async fn exited(
        &self,
        id: &str,
        generation: u64,
        status: std::io::Result<std::process::ExitStatus>,
        stderr: &StderrTail,
    ) {
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        // Its last words (a panic's message is the last line) before the report.
        let stderr = stderr.last_text().await;
        let restart = {
            let mut slots = self.inner.slots.lock().await;
            let Some(slot) = slots.get_mut(id) else {
                return;
            };
            if slot.generation != generation {
                return;
            }
            let exit = slot.exited(&status, &stderr, self.inner.restart);
            let restart = exit == Exit::Crashed { restart: true };
            let crashed = matches!(exit, Exit::Crashed { .. });
            let restarts = slot.restarts;
            self.publish(&slots).await;
            drop(slots);
            if crashed {
                tracing::warn!(instance = id, %status, "instance crashed");
                // With its last stderr lines, as ListInstances' last_error has them: the
                // event log is where a crash is looked into afterwards.
                let mut fields = vec![("instance", id), ("status", status.as_str())];
                if !stderr.is_empty() {
                    fields.push(("stderr", stderr.as_str()));
                }
                self.inner.events.lifecycle("crashed", &fields);
            } else {
                tracing::info!(instance = id, "instance stopped");
                self.inner.events.lifecycle("stopped", &[("instance", id)]);
            }
            restart.then_some(restarts)
        };
        if let Some(restarts) = restart {
            let backoff = restart_backoff(restarts);
            let this = self.clone();
            let id = id.to_owned();
            let cancel = self.inner.cancel.clone();
            self.inner.tracker.spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = cancel.cancelled() => return,
                }
                {
                    let mut slots = this.inner.slots.lock().await;
                    match slots.get_mut(&id) {
                        Some(slot) if slot.still_crashed() => slot.restarts += 1,
                        _ => return,
                    }
                }
                if this.start(&id).await.is_ok() {
                    this.inner
                        .events
                        .lifecycle("restarted", &[("instance", &id)]);
                }
            });
        }
    }

    /// Stops an instance: drain (out of rotation, wait for in-flight calls, SIGTERM, SIGKILL
    /// after the grace period), or SIGKILL at once with `force`. Returns once it has exited.
    ///
    /// # Errors
    ///
    /// [`ControlError::NotFound`] for an unknown id.
    pub async fn stop(&self, id: &str, force: bool) -> Result<Instance, ControlError> {
        let (pid, generation, addr) = {
            let mut slots = self.inner.slots.lock().await;
            let Some(slot) = slots.get_mut(id) else {
                drop(slots);
                return Err(self.not_found(id).await);
            };
            slot.stopping = true;
            if slot.pid == 0 {
                // Crashed and waiting to restart, or still being spawned: neither may come up.
                if slot.state != InstanceState::Stopped {
                    slot.state = InstanceState::Stopped;
                    slot.serving_since = None;
                }
                let snapshot = self.snapshot_of(slot);
                self.publish(&slots).await;
                return Ok(snapshot);
            }
            if !force {
                // A kill does not drain: the instance stays as it is until it is gone (then
                // stopped), so nobody reads a kill as a drain.
                slot.state = InstanceState::Draining;
            }
            let out = (slot.pid, slot.generation, slot.listen.clone());
            self.publish(&slots).await;
            out
        };
        tracing::info!(instance = id, force, "stopping instance");
        self.inner.events.lifecycle(
            if force { "killing" } else { "draining" },
            &[("instance", id)],
        );
        if force {
            process::signal(pid, true);
        } else {
            // The gateway takes it out of rotation from the snapshot just published; calls
            // already there finish first. A registered instance leaves the registry itself on
            // SIGTERM, before it drains: no waiting here.
            if !self.inner.register {
                let _ = tokio::time::timeout(
                    self.inner.drain_timeout,
                    wait_idle(&addr, self.inner.tls.as_ref()),
                )
                .await;
            }
            if self.still_running(id, generation, pid).await {
                process::signal(pid, false);
            }
        }
        let mut snapshots = self.subscribe();
        let exited = tokio::time::timeout(self.inner.grace, async {
            loop {
                let gone = snapshots
                    .borrow_and_update()
                    .instances
                    .iter()
                    .any(|i| i.id == id && i.pid == 0);
                if gone {
                    return;
                }
                if snapshots.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if exited.is_err() {
            tracing::warn!(instance = id, "grace period over; killing");
            if self.still_running(id, generation, pid).await {
                process::signal(pid, true);
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if snapshots
                        .borrow_and_update()
                        .instances
                        .iter()
                        .any(|i| i.id == id && i.pid == 0)
                    {
                        return;
                    }
                    if snapshots.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
        }
        let slots = self.inner.slots.lock().await;
        match slots.get(id) {
            Some(slot) => Ok(self.snapshot_of(slot)),
            None => Err(ControlError::NotFound {
                id: id.to_owned(),
                known: slots.keys().cloned().collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// Is `pid` still this slot's live process (so signalling it cannot hit a reused pid)?
    pub(super) async fn still_running(&self, id: &str, generation: u64, pid: u32) -> bool {
        self.inner
            .slots
            .lock()
            .await
            .get(id)
            .is_some_and(|slot| slot.generation == generation && slot.pid == pid && pid != 0)
    }
}
