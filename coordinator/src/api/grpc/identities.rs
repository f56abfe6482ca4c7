//! Identities, join tokens and API tokens.

use super::*;

pub(super) fn identity_info(a: &crate::identity::Assigned) -> pb::IdentityInfo {
    pb::IdentityInfo {
        name: a.name.clone(),
        client_id: a.client_id.clone(),
        r#type: a.kind.as_str().into(),
    }
}

pub(super) fn cluster_identities(info: &crate::control::ClusterInfo) -> pb::ClusterIdentities {
    pb::ClusterIdentities {
        cluster: info.cluster.spec.name.clone(),
        identities: info.identities.iter().map(identity_info).collect(),
    }
}

pub(super) fn user_identity(identity: crate::model::Identity) -> pb::IdentityInfo {
    pb::IdentityInfo {
        name: identity.name,
        client_id: identity.client_id,
        r#type: crate::model::IdentityKind::UserAssigned.as_str().into(),
    }
}

#[tonic::async_trait]
impl pb::identities_server::Identities for Api {
    async fn create(
        &self,
        request: Request<pb::IdentityRequest>,
    ) -> Result<Response<pb::IdentityInfo>, Status> {
        let name = request.into_inner().name;
        let identity = self.control.create_identity(name).await?;
        Ok(Response::new(user_identity(identity)))
    }

    async fn list(
        &self,
        _: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::IdentityList>, Status> {
        let identities = self
            .control
            .list_identities()
            .await?
            .into_iter()
            .map(user_identity)
            .collect();
        Ok(Response::new(pb::IdentityList { identities }))
    }

    async fn assign(
        &self,
        request: Request<pb::ClusterIdentity>,
    ) -> Result<Response<pb::ClusterIdentities>, Status> {
        let asked = request.into_inner();
        let info = self
            .control
            .assign_identity(asked.cluster, asked.identity)
            .await?;
        Ok(Response::new(cluster_identities(&info)))
    }

    async fn remove(
        &self,
        request: Request<pb::ClusterIdentity>,
    ) -> Result<Response<pb::ClusterIdentities>, Status> {
        let asked = request.into_inner();
        let info = self
            .control
            .remove_identity(asked.cluster, asked.identity)
            .await?;
        Ok(Response::new(cluster_identities(&info)))
    }

    async fn get(
        &self,
        request: Request<pb::ClusterRef>,
    ) -> Result<Response<pb::ClusterIdentities>, Status> {
        let info = self.control.get_cluster(request.into_inner().name).await?;
        Ok(Response::new(cluster_identities(&info)))
    }
}

pub(super) fn join_token_info(t: crate::auth::JoinTokenInfo) -> pb::JoinTokenInfo {
    pb::JoinTokenInfo {
        id: t.id,
        cluster: t.cluster,
        expires_at_ms: t.expires_at_ms,
        uses_left: t.uses_left,
        revoked: t.revoked,
    }
}

#[tonic::async_trait]
impl pb::join_tokens_server::JoinTokens for Api {
    async fn create(
        &self,
        request: Request<pb::JoinTokenRequest>,
    ) -> Result<Response<pb::JoinTokenCreated>, Status> {
        let asked = request.into_inner();
        self.control.get_cluster(asked.cluster.clone()).await?;
        let ttl_seconds = if asked.ttl_seconds == 0 {
            86_400
        } else {
            asked.ttl_seconds
        };
        let ttl_ms = i64::try_from(ttl_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
        let token = self
            .auth
            .create_join_token(&asked.cluster, ttl_ms, asked.uses.max(1))?;
        let id = token.split('_').nth(2).unwrap_or_default().to_string();
        let info = self.auth.join_tokens()?.into_iter().find(|t| t.id == id);
        Ok(Response::new(pb::JoinTokenCreated {
            info: info.map(join_token_info),
            token,
        }))
    }

    async fn list(
        &self,
        _: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::JoinTokenList>, Status> {
        let tokens = self
            .auth
            .join_tokens()?
            .into_iter()
            .map(join_token_info)
            .collect();
        Ok(Response::new(pb::JoinTokenList { tokens }))
    }

    async fn revoke(
        &self,
        request: Request<pb::TokenRef>,
    ) -> Result<Response<pb::JoinTokenInfo>, Status> {
        let id = request.into_inner().id;
        if !self.auth.revoke_join_token(&id)? {
            return Err(Status::not_found(format!("no live join token `{id}`")));
        }
        let info = self
            .auth
            .join_tokens()?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| Status::not_found(format!("no join token `{id}`")))?;
        Ok(Response::new(join_token_info(info)))
    }
}

pub(super) fn token_info(t: crate::auth::TokenInfo) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id,
        role: t.kind,
        name: t.subject,
        created_at_ms: t.created_at_ms,
        revoked: t.revoked,
    }
}

impl Api {
    /// The API token `id`, as listed.
    fn token(&self, id: &str) -> Result<pb::TokenInfo, Status> {
        self.auth
            .list()?
            .into_iter()
            .find(|t| t.id == id)
            .map(token_info)
            .ok_or_else(|| {
                Status::not_found(format!("no token `{id}`; `shoal token list` shows them"))
            })
    }
}

#[tonic::async_trait]
impl pb::tokens_server::Tokens for Api {
    async fn create(
        &self,
        request: Request<pb::TokenRequest>,
    ) -> Result<Response<pb::TokenCreated>, Status> {
        let asked = request.into_inner();
        let role = crate::auth::Role::parse(&asked.role)?;
        let token = self.auth.create_token(role, &asked.name)?;
        let id = token.split('_').nth(1).unwrap_or_default();
        Ok(Response::new(pb::TokenCreated {
            info: Some(self.token(id)?),
            token,
        }))
    }

    async fn list(
        &self,
        _: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::TokenList>, Status> {
        let tokens = self.auth.list()?.into_iter().map(token_info).collect();
        Ok(Response::new(pb::TokenList { tokens }))
    }

    async fn revoke(
        &self,
        request: Request<pb::TokenRef>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let id = request.into_inner().id;
        self.token(&id)?;
        self.auth.revoke(&id)?;
        Ok(Response::new(self.token(&id)?))
    }
}
