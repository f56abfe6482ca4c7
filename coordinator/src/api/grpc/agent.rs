//! The Agent service: the agent's session and its calls about instances.

use super::*;

#[tonic::async_trait]
impl pb::agent_server::Agent for Api {
    type SessionStream = ResponseStream<pb::CoordinatorMessage>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        use pb::agent_message::Msg;
        let principal = request.extensions().get::<Principal>().cloned();
        let mut inbound = request.into_inner();
        let Some(Msg::Register(register)) = inbound.message().await?.and_then(|m| m.msg) else {
            return Err(Status::invalid_argument(
                "an agent session must start with Register",
            ));
        };
        if register.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "agent speaks protocol v{}, this coordinator v{PROTOCOL_VERSION}; run the same shoal version on both",
                register.protocol_version
            )));
        }
        let node_id = register.node_id.clone();
        same_node(principal.as_ref(), &node_id)?;
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let (link, outbound) = mpsc::unbounded_channel();
        self.control
            .register_agent(convert::registration(register), session, link.clone())
            .await?;
        self.exec.attach(&node_id, session, link.clone());
        let control = self.control.clone();
        let exec = self.exec.clone();
        tokio::spawn(async move {
            loop {
                let message = match inbound.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(status) => {
                        debug!(node = %node_id, %status, "agent stream ended");
                        break;
                    }
                };
                let command = match message.msg {
                    Some(Msg::Heartbeat(hb)) => {
                        // The agent fences itself when these stop coming.
                        let _ = link.send(crate::control::ToAgent::Pong);
                        let cpu_percent = hb.cpu_percent;
                        let memory_used_bytes = hb.memory_used_bytes;
                        let (stats, usage) = convert::heartbeat(hb);
                        Command::Heartbeat {
                            node_id: node_id.clone(),
                            cpu_percent,
                            memory_used_bytes,
                            stats,
                            usage,
                        }
                    }
                    Some(Msg::Event(event)) => {
                        let slot = Slot {
                            attempt_id: event.attempt_id,
                            instance: event.instance,
                        };
                        match event.kind {
                            Some(pb::attempt_event::Kind::Started(started)) => {
                                Command::InstanceStarted {
                                    node_id: node_id.clone(),
                                    slot,
                                    gpus: started.gpus,
                                }
                            }
                            Some(pb::attempt_event::Kind::Exited(exited)) => {
                                Command::InstanceExited {
                                    node_id: node_id.clone(),
                                    slot,
                                    exit: convert::exited(exited),
                                }
                            }
                            None => continue,
                        }
                    }
                    Some(Msg::Log(log)) => Command::Log {
                        node_id: node_id.clone(),
                        slot: Slot {
                            attempt_id: log.attempt_id,
                            instance: log.instance,
                        },
                        stream: log.stream,
                        data: log.data,
                    },
                    Some(Msg::Exec(frame)) => {
                        exec.frame(&node_id, &control, frame).await;
                        continue;
                    }
                    Some(Msg::Leaving(leaving)) => Command::AgentLeaving {
                        node_id: node_id.clone(),
                        reason: leaving.reason,
                    },
                    Some(Msg::Register(_)) => {
                        warn!(node = %node_id, "second Register on one session ignored");
                        continue;
                    }
                    None => continue,
                };
                if !control.send(command).await {
                    break;
                }
            }
            exec.detach(&node_id, session);
            control.send(Command::AgentGone { node_id, session }).await;
        });
        let stream = UnboundedReceiverStream::new(outbound).map(|m| Ok(convert::to_agent(m)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_code(
        &self,
        request: Request<pb::AttemptRef>,
    ) -> Result<Response<pb::Artifact>, Status> {
        let node = caller_node(&request)?;
        let asked = request.into_inner();
        let claim = claim(node, asked.attempt_id, asked.instance, asked.token);
        let granted = self.control.authorize(claim, AgentCall::FetchCode).await?;
        let Some(path) = granted.code_path else {
            return Err(Status::not_found(format!(
                "job `{}` has no code snapshot",
                granted.job_id
            )));
        };
        let data = Artifacts::read(&path).await?;
        Ok(Response::new(pb::Artifact { data }))
    }

    async fn fetch_input(
        &self,
        request: Request<pb::InputRef>,
    ) -> Result<Response<pb::Artifact>, Status> {
        let node = caller_node(&request)?;
        let asked = request.into_inner();
        let instance = asked.instance.unwrap_or_default();
        let claim = claim(node, instance.attempt_id, instance.instance, instance.token);
        let granted = self.control.authorize(claim, AgentCall::FetchInput).await?;
        let job = self.job(&granted.job_id).await?;
        let input = job.spec.extras.inputs.get(&asked.name).ok_or_else(|| {
            Status::not_found(format!("job {} has no input `{}`", job.id, asked.name))
        })?;
        let data = self
            .read_whole(&format!("inputs.{}", asked.name), input)
            .await?;
        Ok(Response::new(pb::Artifact { data }))
    }

    async fn restore_outputs(
        &self,
        request: Request<pb::AttemptRef>,
    ) -> Result<Response<pb::Artifact>, Status> {
        let node = caller_node(&request)?;
        let asked = request.into_inner();
        let instance = asked.instance;
        let claim = claim(node, asked.attempt_id, instance, asked.token);
        let granted = self
            .control
            .authorize(claim, AgentCall::RestoreOutputs)
            .await?;
        for attempt in &granted.earlier_attempts {
            if let Some(data) = self.artifacts.instance_outputs(attempt, instance).await? {
                return Ok(Response::new(pb::Artifact { data }));
            }
        }
        Ok(Response::new(pb::Artifact { data: Vec::new() }))
    }

    async fn work(
        &self,
        request: Request<pb::WorkRequest>,
    ) -> Result<Response<pb::MiniBatchLease>, Status> {
        let node_id = caller_node(&request)?;
        let work = request.into_inner();
        same_node(
            Some(&Principal::Node {
                node_id: node_id.clone(),
            }),
            &work.node_id,
        )?;
        let request = crate::control::WorkRequest {
            node_id,
            token: work.token,
            slot: Slot {
                attempt_id: work.attempt_id,
                instance: work.instance,
            },
            report: work.report.map(|r| crate::control::MiniBatchResult {
                lease: r.lease,
                ok: r.ok,
                rows: r.rows,
                message: r.message,
                failed_items: r.failed_items,
            }),
            want_next: work.want_next,
        };
        let reply = self.control.work(request).await?;
        let mut lease = pb::MiniBatchLease {
            accepted: reply.accepted,
            finished: reply.finished,
            wait_ms: reply.wait_ms,
            ..Default::default()
        };
        if let Some(leased) = reply.lease {
            lease.lease = leased.lease;
            lease.index = leased.index;
            lease.execution = leased.execution;
            lease.items = self.reader.items(&leased.job_id, leased.index).await?;
            lease.folder = leased.folder;
            lease.timeout_seconds = leased.timeout_seconds.unwrap_or(0);
        }
        Ok(Response::new(lease))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let asked = request.into_inner();
        let joining = self.auth.use_join_token(&asked.join_token).map_err(|why| {
            warn!(%why, hostname = %asked.hostname, "join refused");
            Status::unauthenticated(format!(
                "{why}; ask an admin for one (`shoal join-token create`)"
            ))
        })?;
        let node = self
            .control
            .join_node(
                joining.cluster.clone(),
                joining.node_id,
                asked.hostname,
                asked.cores,
                asked.memory_bytes,
            )
            .await?;
        let credential = self.auth.node_credential(&node.id)?;
        Ok(Response::new(pb::JoinReply {
            node_id: node.id,
            cluster: joining.cluster,
            credential,
        }))
    }

    async fn issue_token(
        &self,
        request: Request<pb::JobTokenRequest>,
    ) -> Result<Response<pb::JobToken>, Status> {
        let node = caller_node(&request)?;
        let asked = request.into_inner();
        let Some(signer) = &self.signer else {
            return Err(Status::failed_precondition(
                "this coordinator issues no identity tokens",
            ));
        };
        if asked.resource.trim().is_empty() {
            return Err(Status::invalid_argument(
                "give the resource the token is for: ?resource=https://...",
            ));
        }
        let attempt_id = asked.attempt_id.clone();
        let claim = claim(node, asked.attempt_id, asked.instance, asked.token);
        let granted = match self.control.authorize(claim, AgentCall::IssueToken).await {
            Err(crate::Error::PermissionDenied(why)) if why.ends_with("has ended") => {
                return Err(Status::unauthenticated(why));
            }
            other => other?,
        };
        let cluster = granted.cluster;
        let assigned = self.control.get_cluster(cluster.clone()).await?.identities;
        if assigned.is_empty() {
            return Err(Status::failed_precondition(format!(
                "cluster `{cluster}` has no managed identity; assign one with `shoal cluster identity assign --name {cluster} '[system]'`"
            )));
        }
        let chosen = if asked.client_id.is_empty() {
            assigned.first()
        } else {
            assigned.iter().find(|a| a.client_id == asked.client_id)
        };
        let Some(identity) = chosen else {
            return Err(Status::permission_denied(format!(
                "identity {} is not assigned to cluster `{cluster}`",
                asked.client_id
            )));
        };
        let now = crate::auth::now_ms() / 1000;
        let issued = signer.issue(
            &identity.client_id,
            identity.kind.as_str(),
            &asked.resource,
            &cluster,
            &granted.job_id,
            &attempt_id,
            now,
        )?;
        Ok(Response::new(pb::JobToken {
            access_token: issued.access_token,
            expires_on: issued.expires_on,
            resource: asked.resource,
            client_id: identity.client_id.clone(),
        }))
    }

    async fn track(
        &self,
        request: Request<pb::TrackCall>,
    ) -> Result<Response<pb::TrackReply>, Status> {
        use tower::ServiceExt;
        let node = caller_node(&request)?;
        let call = request.into_inner();
        let (Some(tracking), Some(routes)) = (&self.tracking, &self.tracking_routes) else {
            return Err(Status::failed_precondition(
                "this coordinator serves no tracking API",
            ));
        };
        if !call.path_and_query.starts_with("/api/2.0/mlflow") {
            return Err(Status::invalid_argument(format!(
                "`{}` is not a tracking call (/api/2.0/mlflow...)",
                call.path_and_query
            )));
        }
        let caller = match tracking.granted(&node, &call.attempt_id, call.instance, &call.token) {
            Some(caller) => caller,
            None => {
                let claim = claim(
                    node.clone(),
                    call.attempt_id.clone(),
                    call.instance,
                    call.token.clone(),
                );
                let granted = self.control.authorize(claim, AgentCall::Track).await?;
                let caller = crate::tracking::JobCaller {
                    job_id: granted.job_id,
                    attempt_id: call.attempt_id.clone(),
                    instance: call.instance,
                    node,
                    cluster: granted.cluster,
                    experiment: granted.experiment,
                    run_name: granted.job_name,
                };
                tracking.ensure_job_run(&caller).await?;
                tracking.remember_grant(&call.token, &caller);
                caller
            }
        };
        let mut relayed = axum::http::Request::builder()
            .method(call.method.as_str())
            .uri(call.path_and_query.as_str());
        if !call.content_type.is_empty() {
            relayed = relayed.header(axum::http::header::CONTENT_TYPE, call.content_type);
        }
        let mut relayed = relayed
            .body(axum::body::Body::from(call.body))
            .map_err(|e| Status::invalid_argument(format!("not an HTTP request: {e}")))?;
        relayed
            .extensions_mut()
            .insert(crate::tracking::Caller::Job(Box::new(caller)));
        let answer = routes
            .clone()
            .oneshot(relayed)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let (parts, body) = answer.into_parts();
        let body = axum::body::to_bytes(body, crate::server::MAX_MESSAGE_BYTES)
            .await
            .map_err(|e| Status::internal(format!("tracking answer: {e}")))?;
        Ok(Response::new(pb::TrackReply {
            status: u32::from(parts.status.as_u16()),
            content_type: parts
                .headers
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            body: body.to_vec(),
        }))
    }

    async fn upload_outputs(
        &self,
        request: Request<pb::OutputsUpload>,
    ) -> Result<Response<pb::UploadAck>, Status> {
        let node = caller_node(&request)?;
        let upload = request.into_inner();
        let attempt_id = upload.attempt_id.clone();
        let claim = claim(node, upload.attempt_id, upload.instance, upload.token);
        let granted = self
            .control
            .authorize(claim, AgentCall::UploadOutputs)
            .await?;
        if upload.output_name.is_empty() {
            self.artifacts
                .put_outputs(&attempt_id, upload.instance, upload.data)
                .await?;
        } else {
            self.keep_named(
                &granted.job_id,
                &attempt_id,
                upload.instance,
                &upload.output_name,
                upload.data,
            )
            .await?;
        }
        Ok(Response::new(pb::UploadAck {}))
    }
}
