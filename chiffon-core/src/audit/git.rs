// TEMP stub for compiling the engine; replaced by the real module.
pub struct RequestRecord {
    pub id: uuid::Uuid,
    pub summary: String,
    pub author_name: String,
    pub author_email: String,
    pub document: serde_json::Value,
}
pub struct GitTrail;
impl GitTrail {
    pub fn commit_request(&self, _r: &RequestRecord) -> Result<String, std::io::Error> {
        Err(std::io::Error::other("stub"))
    }
    pub fn find_commit_for(&self, _id: uuid::Uuid) -> Result<Option<String>, std::io::Error> {
        Ok(None)
    }
}
