// An automerge-repo client of a sync-node site: creates a document (or opens
// the one at URL), adds a greeting, and leaves once the site holds it.
//   node hello.mjs 'ws://127.0.0.1:7070/v1/automerge-repo?token=TOKEN' [automerge:...]
import * as A from "@automerge/automerge"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const [server, url] = process.argv.slice(2)
const repo = new Repo({ network: [new WebSocketClientAdapter(server)] })
const handle = url ? await repo.find(url) : repo.create({ greetings: [] })
handle.change(doc => doc.greetings.push(`hello from ${process.pid}`))
console.log(handle.url, JSON.stringify(handle.doc()))

// The site stores a client's document as repo/ID; its HTTP API shows the heads.
const api = server.replace(/^ws/, "http").split("/v1/")[0]
const token = new URL(server).searchParams.get("token")
const mine = JSON.stringify(A.getHeads(handle.doc()).sort())
for (;;) {
  const response = await fetch(`${api}/v1/docs/repo%2F${handle.documentId}`, {
    headers: { authorization: `Bearer ${token}` },
  })
  if (response.ok && JSON.stringify((await response.json()).heads.sort()) === mine) break
  await new Promise(resolve => setTimeout(resolve, 50))
}
await repo.shutdown()
