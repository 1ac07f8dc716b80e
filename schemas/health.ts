import { Type } from '@sinclair/typebox'
import { ErrorSchema } from './error.ts'

const DatabaseKind = Type.Union([Type.Literal('postgresql'), Type.Literal('embedded')], {
  description: 'postgresql: the server of DATABASE_URL; embedded: the development database'
})

export const HealthSchema = Type.Object({
  status: Type.Literal('ok'),
  database: Type.Literal('ok'),
  databaseKind: DatabaseKind
})

/**
 * A 503 from /health: the error shape, plus what the check found when it ran (a request shed
 * under load, or refused before the check, carries the error shape alone).
 */
export const HealthUnavailableSchema = Type.Composite([ErrorSchema, Type.Object({
  status: Type.Optional(Type.Literal('error')),
  database: Type.Optional(Type.Literal('unavailable')),
  databaseKind: Type.Optional(DatabaseKind)
})])

export const LiveSchema = Type.Object({ status: Type.Literal('ok') })
