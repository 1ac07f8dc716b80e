import { Type } from '@sinclair/typebox'

export const HealthSchema = Type.Object({
  status: Type.Union([Type.Literal('ok'), Type.Literal('error')]),
  database: Type.Union([Type.Literal('ok'), Type.Literal('unreachable')]),
  databaseKind: Type.Union([Type.Literal('postgresql'), Type.Literal('embedded')], {
    description: 'postgresql: the server of DATABASE_URL; embedded: the development database'
  }),
  error: Type.Optional(Type.String({ description: 'why the database check failed' }))
})

export const LiveSchema = Type.Object({ status: Type.Literal('ok') })
